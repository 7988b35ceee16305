"""Helpers shared by the tests (plain functions and constants; the fixtures live in conftest.py).

Import them as `from helpers import FAST_FLAGS, write_stage_env` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Small, fast settings layered on top as flags, the way a user overrides a config.env.
FAST_FLAGS = [
    "--max_train_steps=3",
    "--resolution=64",
    "--learning_rate=1e-4",
    "--validation_num_inference_steps=4",
    "--validation_prompt=a red circle, for validation",
]


def write_stage_env(folder: Path, stage: int, model: Path, output: Path, dataloader: Path) -> Path:
    """The recipe's config.env for `stage`, word for word but for local paths."""
    from expertune.demo.recipe import recipe_env

    path = folder / f"stage{stage}.env"
    path.write_text(recipe_env(stage, model, output, dataloader), encoding="utf-8")
    return path


def evaluation_flags(clip_dir: Path) -> list[str]:
    """CLIP score with the tiny local CLIP, and the per-band loss on one held-out image of six."""
    return ["--evaluation_type=clip", f"--pretrained_evaluation_model_name_or_path={clip_dir}",
            "--eval_holdout_fraction=0.17", "--eval_timesteps_per_subband=2"]


def write_messy_datasets(root: Path) -> Path:
    """Three datasets of every shape and flaw the data path must survive, and their dataloader JSON.

    photos (textfile captions, aspect buckets at 64 px aligned to 32, minimum_image_size 32): nine
    usable images — 64x64 squares (among them CMYK, 16-bit grey, palette with transparency, one with
    two caption lines), two landscapes bucketed 96x64 (w x h), one portrait 64x96 — and six that are
    skipped: zero-byte, truncated, not an image, a decompression bomb, too small, a non-UTF-8 caption.
    names (filename captions, repeats 1, probability 2): two squares. subject (instanceprompt): one.
    No cache dirs are named: the caches go to the per-user default (tests isolate XDG_CACHE_HOME).
    """
    import json
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)

    def noise(size: tuple[int, int]) -> Image.Image:  # size is (w, h)
        return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")

    photos = root / "photos"
    photos.mkdir(parents=True)
    captions = {}
    for name, size in [("wide.png", (96, 64)), ("wide2.png", (100, 60)), ("tall.png", (64, 96)),
                       ("square.png", (80, 80)), ("square2.png", (72, 72)), ("tiny.png", (16, 16)),
                       ("multi.png", (64, 64)), ("latin1.png", (64, 64)), ("truncated.png", (64, 64))]:
        noise(size).save(photos / name)
        captions[name] = f"a noise picture called {name[:-4]}"
    captions["multi.png"] = "the first caption of multi\nthe second caption of multi"
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(photos / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(photos / "grey16.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([200, 30, 30, 0, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    palette.save(photos / "palette.png", transparency=1)
    (photos / "zero.png").write_bytes(b"")
    (photos / "notimage.jpg").write_text("this is a text file with an image name")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (photos / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    data = (photos / "truncated.png").read_bytes()
    (photos / "truncated.png").write_bytes(data[: len(data) // 2])
    for name in ("cmyk.jpg", "grey16.png", "palette.png", "zero.png", "notimage.jpg", "bomb.png"):
        captions[name] = f"a picture called {name.split('.')[0]}"
    for name, caption in captions.items():
        (photos / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    (photos / "latin1.txt").write_bytes("une photo d'un caf\xe9".encode("latin-1"))

    names = root / "names"
    names.mkdir()
    noise((64, 64)).save(names / "red_square.png")
    noise((70, 64)).save(names / "blue-circle.png")
    subject = root / "subject"
    subject.mkdir()
    noise((64, 80)).save(subject / "one.png")

    loader = root / "dataloader.json"
    loader.write_text(json.dumps([
        {"id": "photos", "type": "local", "instance_data_dir": str(photos), "caption_strategy": "textfile",
         "resolution": 64, "crop_aspect": "preserve", "aspect_bucket_alignment": 32, "minimum_image_size": 32},
        {"id": "names", "instance_data_dir": str(names), "caption_strategy": "filename", "resolution": 64,
         "crop_style": "random", "repeats": 1, "probability": 2},
        {"id": "subject", "instance_data_dir": str(subject), "caption_strategy": "instanceprompt",
         "instance_prompt": "a photo of sks", "resolution": 64},
    ], indent=2))
    return loader


MESSY_SKIPPED = {  # file -> words its reason must hold
    "zero.png": "empty (0 bytes)", "truncated.png": "truncated", "notimage.jpg": "cannot read the image",
    "bomb.png": "over the limit", "tiny.png": "below minimum_image_size 32", "latin1.png": "not UTF-8",
}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensor names and bit-identical values."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def wait_for_steps(output: Path, steps: int, process: subprocess.Popen, timeout: float = 90) -> None:
    """Until `output/metrics.jsonl` holds `steps` training rows, the process ends, or `timeout` passes."""
    from expertune.train.metrics import read_metrics

    deadline = time.monotonic() + timeout
    path = output / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(read_metrics(path)) >= steps:
            return
        time.sleep(0.01)


def kill_and_resume(launch: Callable[..., subprocess.Popen], output: Path, *, seed: int, kills: int,
                    kill_before_step: int, attempts: int, timeout: float = 120) -> int:
    """Run `launch(*flags)` into `output` until a run finishes, SIGKILLing each of the first `kills` runs at a
    random moment (after 1 to `kill_before_step` - 1 logged steps, then up to 0.25 s more: anywhere in a step or a
    checkpoint write). Each later run resumes from the latest checkpoint (or starts afresh if none was written).
    Asserts every run ends killed or cleanly and that one finished; returns how many were killed."""
    rng = random.Random(seed)
    killed, out, code = 0, "", None
    for _ in range(attempts):
        resume = ["--resume_from_checkpoint=latest"] if any((output / "checkpoints").glob("checkpoint-*")) else [
            "--overwrite_output_dir"]
        process = launch(*resume)
        if killed < kills:
            wait_for_steps(output, rng.randint(1, kill_before_step - 1), process, timeout=timeout)
            time.sleep(rng.uniform(0.0, 0.25))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                killed += 1
        out, _ = process.communicate(timeout=timeout * 2)
        code = process.returncode
        if code == 0:
            break
        assert code == -signal.SIGKILL, out
    assert killed >= 1 and code == 0, out
    return killed


class FakeAccelerator:
    """The three things the Validator asks of accelerate's Accelerator (CPU, main process, `log`), no tracker."""

    device = torch.device("cpu")
    is_main_process = True

    def log(self, values, step):  # noqa: D401 - same signature as Accelerator.log
        self.logged = (values, step)


# --------------------------------------------------------------------------------------------------
# A real small file system, for full-disk tests (issue 20): a size-limited tmpfs mounted for the test.


class SmallFilesystem:
    """A mounted size-limited tmpfs at `path`; `fill(leave)` takes all but `leave` bytes of its space."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def free(self) -> int:
        import shutil

        return shutil.disk_usage(self.path).free

    def fill(self, leave: int = 0) -> Path:
        """Write a filler file until at most `leave` bytes are free; returns the filler (delete it to free)."""
        filler = self.path / ".filler"
        with open(filler, "ab") as stream:
            while (room := self.free() - leave) > 0:
                try:
                    stream.write(b"\0" * min(room, 1 << 20))
                    stream.flush()
                except OSError:
                    break
        return filler


def mount_small_filesystem(path: Path, size: str = "2m") -> SmallFilesystem | str:
    """Mount a tmpfs of `size` at `path` (which is created): the mounted file system, or why it cannot be."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        return "no mount command on this machine"
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs here (root and mount rights needed): {done.stderr.strip() or done.returncode}"
    return SmallFilesystem(path)


def unmount_small_filesystem(filesystem: SmallFilesystem) -> None:
    subprocess.run(["umount", "-l", str(filesystem.path)], capture_output=True)
