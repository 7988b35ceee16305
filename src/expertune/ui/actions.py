"""What the UI's buttons do, as jobs of expertune's own verbs (argv lists, never a shell string), or one file.

- start a run: `expertune train --config FILE` (TOML or SimpleTuner's JSON / TOML) or `--env FILE` (config.env),
  checked first by the config loader (a bad config is refused at once, naming the field);
- export a checkpoint: `expertune export CKPT --export_format diffusers,single_file` (export.run.export_run);
- sample now: `expertune generate --expert CKPT [--expert PEER]` through the chain of that checkpoint's experts
  (and the other stage's expert the run validated its chain with), image under `.expertune-ui/samples/`;
- stop after the next checkpoint: the file `stop_requested` in the run's folder (train.signals.StopRequests);
- write a starter config from `expertune init`'s questions (init.write_starter), to start a run from.
"""

from __future__ import annotations

import re
from pathlib import Path

from expertune.errors import ConfigError, ExpertuneError
from expertune.export.formats import parse_formats
from expertune.ui.jobs import Job
from expertune.ui.runs import STOP_FILE, UI_DIR, lock_state, read_json, run_config
from expertune.ui.safety import Refused, inside

CONFIG_SUFFIXES = (".toml", ".json", ".env")


def _relative(workspace: Path, path: Path) -> str:
    return path.relative_to(workspace.resolve()).as_posix()


def train_job(workspace: Path, config_file: str) -> Job:
    """A training job for a config file inside the workspace, validated now (paths relative to the workspace)."""
    import os

    from expertune.config import load_config

    path = inside(workspace, config_file)
    if path.suffix.lower() not in CONFIG_SUFFIXES or not path.is_file():
        raise Refused(400, f"{config_file}: not a config file (.toml, .json or .env) in the workspace")
    flag = "--env" if path.suffix.lower() == ".env" else "--config"
    args = [flag, str(path)]
    here = os.getcwd()
    try:
        os.chdir(workspace)  # the job runs there: relative paths in the config mean the same now
        config, _ = load_config(args)
        config.require_for_training()
    except ExpertuneError as error:
        raise Refused(400, f"{config_file}: {error}") from None
    finally:
        os.chdir(here)
    if config.train.output_dir is None:
        raise Refused(400, f"{config_file}: it sets no output_dir; set one under the workspace")
    output = (workspace / config.train.output_dir).resolve()
    run = _relative(workspace, output) if output == workspace.resolve() or workspace.resolve() in output.parents \
        else None
    if run is None:
        raise Refused(400, f"{config_file}: its output_dir {output} is outside the workspace; the UI starts runs "
                      "that write inside it (set output_dir to a folder under the workspace)")
    return Job("", "train", args, f"train {config_file}", run=run, total_steps=config.train.max_train_steps)


def checkpoint_of(workspace: Path, run: str, checkpoint: str) -> Path:
    if not re.fullmatch(r"checkpoint-\d+", checkpoint):
        raise Refused(400, f"{checkpoint!r} is not a checkpoint name (checkpoint-N)")
    folder = inside(workspace, f"{run}/checkpoints/{checkpoint}")
    if not folder.is_dir():
        raise Refused(404, f"{run}: no {checkpoint}")
    return folder


def export_job(workspace: Path, run: str, checkpoint: str, formats: str, precision: str) -> Job:
    folder = checkpoint_of(workspace, run, checkpoint)
    try:
        parse_formats(formats)
    except ConfigError as error:
        raise Refused(400, str(error)) from None
    if precision not in ("fp32", "fp16", "bf16"):
        raise Refused(400, f"precision {precision!r} is not fp32, fp16 or bf16")
    return Job("", "export", [str(folder), "--export_format", formats, "--precision", precision],
               f"export {run}/{checkpoint} ({formats}, {precision})", run=run)


def sample_job(workspace: Path, run: str, checkpoint: str, prompt: str, seed: int, guidance: float,
               steps: int) -> Job:
    folder = checkpoint_of(workspace, run, checkpoint)
    if not prompt.strip():
        raise Refused(400, "a prompt is required")
    if not 1 <= steps <= 1000 or not 0 <= guidance <= 50 or seed < 0:
        raise Refused(400, "steps must be 1-1000, guidance 0-50, seed 0 or more")
    run_dir = inside(workspace, run)
    run_json, _ = read_json(run_dir / "run.json")
    experts = ["--expert", str(folder)]
    peer = (run_config(run_dir, run_json) or {}).get("validation")
    peer_path = peer.get("validation_peer_expert") if isinstance(peer, dict) else None
    if isinstance(peer_path, str) and peer_path:
        resolved = Path(peer_path).resolve()
        if resolved != workspace.resolve() and workspace.resolve() not in resolved.parents:
            raise Refused(400, f"{run}: its chain's other expert {peer_path} is outside the workspace")
        experts += ["--expert", str(resolved)]
    name = f"{run.replace('/', '_')}-{checkpoint}-seed{seed}-{abs(hash((prompt, guidance, steps))) % 10**8}.png"
    out = workspace.resolve() / UI_DIR / "samples" / name
    args = [*experts, "--prompt", prompt, "--seed", str(seed), "--guidance", str(guidance), "--steps", str(steps),
            "--out", str(out)]
    return Job("", "generate", args, f"sample {run}/{checkpoint}: {prompt[:60]}", run=run,
               output=_relative(workspace, out))


def request_stop(workspace: Path, run: str) -> str:
    """Ask a running run to stop after its next step's checkpoint; returns what was done."""
    run_dir = inside(workspace, run)
    state, holder = lock_state(run_dir)
    if state != "running" and not (run_dir / "metrics.jsonl").exists():
        raise Refused(400, f"{run}: not a run that is going")
    (run_dir / STOP_FILE).write_text("requested from expertune ui\n", encoding="utf-8")
    return f"{run}: it saves a checkpoint at its next step and stops (exit 143)"


def write_init(workspace: Path, folder: str, model: str, layout: str, gpu_memory: float, fmt: str, data: str,
               output: str) -> list[str]:
    """`expertune init`'s starter files in `folder` (inside the workspace, never overwriting a file); the dataset
    and output paths are written relative to the workspace, where the UI's jobs run. Returns the files written."""
    from expertune.init import write_starter

    target = inside(workspace, folder)
    for name, value in (("data", data), ("output", output)):
        inside(workspace, value)  # refuses a path leading out of the workspace
        if not value.strip():
            raise Refused(400, f"init: the {name} folder is required")
    if not 1 <= gpu_memory <= 2048:
        raise Refused(400, f"init: GPU memory {gpu_memory} GiB is out of range (1-2048)")
    try:
        written = write_starter(target, model, layout, gpu_memory, fmt, Path(data), Path(output))
    except ExpertuneError as error:
        raise Refused(400, str(error)) from None
    return [_relative(workspace, path.resolve()) for path in written]
