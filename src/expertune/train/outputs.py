"""A run's output directory: refusing to mix runs, clearing one on request, and what identifies a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from expertune.errors import ConfigError, ExpertuneError, StorageError
from expertune.prepare import PreparedData
from expertune.run_folder import RunLock, remove_leftovers

RUN_MARKERS = ("run.json", "metrics.jsonl", "pipeline", "lora", "checkpoints", "mixture.json")
# What --overwrite_output_dir clears at the start (the old pipeline is replaced only when the new one is saved; a
# mixture.json would name the old run's experts meanwhile, so it goes now). Files the run does not write stay.
REPLACED_ON_OVERWRITE = ("run.json", "metrics.jsonl", "checkpoints", "validation", "mixture.json", "hub_upload")


def lock_output_dir(output_dir: Path, accelerator: Any) -> RunLock:
    """The main process locks `output_dir` for this job (refusing a second job, naming the holder) and removes
    what a killed earlier job left half-done; every rank learns whether that worked."""
    from expertune.train.runtime import agreed

    lock, failure = RunLock(output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
            remove_leftovers(output_dir)
        except (ExpertuneError, OSError) as error:
            lock.release()
            failure = error
    if agreed(accelerator, failure is not None):
        if isinstance(failure, OSError):
            raise StorageError(f"output_dir {output_dir} is not writable: {failure.strerror or failure}") from None
        raise failure or ConfigError(f"output_dir {output_dir}: the main process could not lock it (see its log)")
    return lock


def check_output_dir(output_dir: Path, *, overwrite: bool, resuming: bool, main_process: bool = True) -> None:
    """Never mix a new run into an earlier one's outputs silently. Every process checks; only the main
    one clears an earlier run (`--overwrite_output_dir`)."""
    earlier = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    if earlier and not (overwrite or resuming):
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({', '.join(earlier)}); choose a new --output_dir, "
            "continue it with --resume_from_checkpoint latest, or replace it with --overwrite_output_dir"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise StorageError(f"output_dir {output_dir} is not writable: {error.strerror or error}") from None
    if overwrite and not resuming and main_process:
        for name in REPLACED_ON_OVERWRITE:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def run_identity(prepared: PreparedData, source: str) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint besides the config: the model and the data."""
    digest = hashlib.sha256()
    for item in prepared.items:
        digest.update(json.dumps([item.spec.id, str(item.record.path), list(item.captions)]).encode())
    return {"base_model": source, "training_items": len(prepared.items), "training_items_digest": digest.hexdigest()}
