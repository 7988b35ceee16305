"""A run's output directory: refusing to mix runs, clearing one on request, and what identifies a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from expertune.errors import ConfigError, StorageError
from expertune.prepare import PreparedData

RUN_MARKERS = ("run.json", "metrics.jsonl", "pipeline", "lora", "checkpoints")
# What --overwrite_output_dir clears at the start (the old pipeline is replaced only when the new one is saved).
REPLACED_ON_OVERWRITE = ("run.json", "metrics.jsonl", "checkpoints", "validation", "hub_upload")


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
