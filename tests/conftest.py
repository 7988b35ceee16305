"""Shared fixtures: the tiny SDXL-layout model is built once per test session, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import (  # noqa: F401  (re-exported: older tests import them from conftest)
    FAST_FLAGS,
    MESSY_SKIPPED,
    evaluation_flags,
    write_messy_datasets,
    write_stage_env,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL-layout `StableDiffusionXLPipeline` directory (seed 0). Treat as read-only."""
    from expertune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_refiner_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL-refiner-layout `StableDiffusionXLImg2ImgPipeline` directory (seed 1) with the VAE, text
    encoder 2 and tokenizer 2 of `tiny_model_dir`, as the real refiner ships SDXL's. Treat as read-only."""
    from expertune.models.tiny import build_tiny_refiner

    return build_tiny_refiner(tmp_path_factory.mktemp("models") / "tiny-refiner", seed=1, vae_from=tiny_model_dir,
                              text_encoder_from=tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random CLIPModel + CLIPProcessor directory (seed 0), built offline. Treat as read-only."""
    from expertune.models.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def _torch_extensions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch-extensions")


@pytest.fixture(autouse=True)
def _isolated_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _torch_extensions_dir: Path) -> None:
    """Keep every test's default cache directory out of the user's home. The C++ extensions torch builds at run
    time (DeepSpeed's shared-memory collective) go to one directory for the session, so they are compiled once,
    not once per test (torch would otherwise build them under each test's XDG cache: about 20 s each)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(_torch_extensions_dir))


_OURS = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src" / "expertune"))


def _refuse(item: pytest.Item, what: str) -> Callable[..., None]:
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail(f"{item.nodeid} {what} but is not marked integration: mark it @pytest.mark.integration (the "
                    "marker means 'trains or launches'), or test the unit without training or launching", pytrace=False)
    return refuse


def _refuse_our_launches(item: pytest.Item, start: Callable[..., None]) -> Callable[..., None]:
    """`Popen._execute_child` that fails the test when the process is started by expertune or by the test itself;
    one a library starts for its own needs (ctypes asking ldconfig where a library is) starts as usual."""
    refuse = _refuse(item, "starts a process")

    def execute_child(*args: object, **kwargs: object) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == subprocess.__file__:
            frame = frame.f_back  # type: ignore[assignment]
        caller = str(Path(frame.f_code.co_filename).resolve()) if frame is not None else ""
        if caller.startswith(_OURS):
            refuse()
        start(*args, **kwargs)
    return execute_child


@contextmanager
def _guarded(item: pytest.Item, launches: bool) -> Iterator[None]:
    from expertune.train import loop

    saved = loop.train_step, subprocess.Popen._execute_child  # type: ignore[attr-defined]
    loop.train_step = _refuse(item, "trains an expert")  # type: ignore[assignment]
    if launches:
        subprocess.Popen._execute_child = _refuse_our_launches(item, saved[1])  # type: ignore[attr-defined]
    try:
        yield
    finally:
        loop.train_step, subprocess.Popen._execute_child = saved  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """The `integration` marker means "trains or launches", and this hook and the next hold it. A test without it
    fails when it, or a fixture it sets up, takes a training step (`expertune.train.loop.train_step`, which every
    training run takes); or when its body starts a process from expertune's code or the test's own
    (`subprocess.Popen`, which every launch takes). Fixtures may start services (the S3 tests' moto server)."""
    if item.get_closest_marker("integration") is not None:
        yield
        return
    with _guarded(item, launches=False):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("integration") is not None:
        yield
        return
    with _guarded(item, launches=True):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test not marked `integration` is a `unit` test (`make test-fast` runs only those)."""
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned 96-px images in a local dataset, and a dataloader JSON with its own cache dirs."""
    from expertune.data.captioned import SHAPES, draw_shape, save_captioned_image, write_dataloader_config

    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    for index, (shape, colour, background) in enumerate(SHAPES[:6]):
        save_captioned_image(draw_shape(shape, colour, background, size=96), images / f"shape_{index}.png",
              f"a {colour} {shape} on a {background} background")
    return write_dataloader_config(root / "dataloader.json", images, root / "cache", resolution=64)


@pytest.fixture(scope="session")
def trained_experts(tiny_model_dir: Path, small_dataset: Path, tiny_clip_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory):
    """Stage 1 then stage 2 trained from the recipe's own config.env (3 steps each), sharing caches.

    Both are evaluated (CLIP score, per-band held-out loss); stage 2 also validates the chain through stage 1.
    """
    from expertune.config import load_config
    from expertune.train.loop import train

    from expertune.data.captioned import write_dataloader_config

    root = tmp_path_factory.mktemp("experts")
    # Its own caches, so the encoded/reused counts do not depend on which tests ran before.
    dataloader = write_dataloader_config(root / "dataloader.json", small_dataset.parent / "images", root / "cache",
                                         resolution=64)
    results = []
    for stage in (1, 2):
        env = write_stage_env(root, stage, tiny_model_dir, root / f"stage{stage}", dataloader)
        peer = [f"--validation_peer_expert={results[0].output_dir}"] if stage == 2 else []
        config, _ = load_config(["--env", str(env), *FAST_FLAGS, *evaluation_flags(tiny_clip_dir), *peer])
        results.append(train(config))
    return results[0], results[1]


@pytest.fixture(scope="session")
def messy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataloader JSON of `write_messy_datasets` (read-only: copy it to change files)."""
    return write_messy_datasets(tmp_path_factory.mktemp("messy"))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB file system (a tmpfs mounted for this test; see helpers.mount_small_filesystem), unmounted after.
    Skipped, with the reason, only where mounting is impossible (not root, no mount rights)."""
    from helpers import mount_small_filesystem, unmount_small_filesystem

    mounted = mount_small_filesystem(tmp_path / "small-disk", "2m")
    if isinstance(mounted, str):
        pytest.skip(mounted)
    try:
        yield mounted
    finally:
        unmount_small_filesystem(mounted)
