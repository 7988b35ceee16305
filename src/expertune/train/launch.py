"""Start `expertune train` under `accelerate launch` when the config asks for several processes.

Running `accelerate launch ... -m expertune.cli train ...` by hand works too: a process that already
runs inside a launched group (WORLD_SIZE set) trains directly.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from expertune.config.schema import Config

log = logging.getLogger(__name__)

LAUNCHED_MARKER = "EXPERTUNE_LAUNCHED"


def inside_launched_group() -> bool:
    return LAUNCHED_MARKER in os.environ or "WORLD_SIZE" in os.environ


def needs_launcher(config: Config) -> bool:
    t = config.train
    wants_group = t.num_processes > 1 or t.num_machines > 1 or t.accelerate_config is not None
    return wants_group and not inside_launched_group()


def launch_command(config: Config, train_argv: Sequence[str]) -> list[str]:
    """The `accelerate launch` command line that runs `expertune train <train_argv>` in every process."""
    t = config.train
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        command += ["--config_file", str(t.accelerate_config)]
    elif t.num_processes > 1 or t.num_machines > 1:
        # A process group without a config file: DDP (gloo on CPUs, NCCL on GPUs).
        command.append("--multi_gpu")
    if t.num_processes > 1 or not t.accelerate_config:
        command += ["--num_processes", str(t.num_processes * t.num_machines)]
    if t.num_machines > 1 or not t.accelerate_config:
        command += ["--num_machines", str(t.num_machines)]
    if not t.accelerate_config:
        command += ["--mixed_precision", config.model.mixed_precision, "--dynamo_backend", "no"]
    if t.accelerate_extra_args:
        command += shlex.split(t.accelerate_extra_args)
    return command + ["-m", "expertune.cli", "train", *train_argv]


def engine_in_config_file(path: str | os.PathLike[str]) -> str | None:
    """"fsdp" or "deepspeed" when an accelerate config file asks for that engine, else None (DDP and friends)."""
    import yaml

    from expertune.errors import ConfigError

    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"--accelerate_config {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--accelerate_config {path}: not valid YAML ({error})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--accelerate_config {path}: expected a mapping of accelerate settings")
    kind = str(settings.get("distributed_type", "")).upper()
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(kind)


def check_before_launch(config: Config) -> None:
    """Refuse, in this one process, what every launched process would refuse (and say it once)."""
    from expertune.train.runtime import has_accelerator
    from expertune.train.strategy import check_engine_available, check_supported

    if not config.train.accelerate_config:
        return
    engine = engine_in_config_file(config.train.accelerate_config)
    if engine is not None:
        check_supported(config, engine)
        check_engine_available(engine, has_accelerator())


def relaunch(config: Config, train_argv: Sequence[str]) -> int:
    """Run the training under accelerate and return its exit code."""
    check_before_launch(config)
    command = launch_command(config, train_argv)
    log.info("launching %d processes: %s", config.train.num_processes * config.train.num_machines,
             shlex.join(command))
    env = dict(os.environ, **{LAUNCHED_MARKER: "1"})
    return subprocess.call(command, env=env)
