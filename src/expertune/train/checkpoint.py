"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory `<output_dir>/checkpoints/checkpoint-<step>`:

    unet.safetensors        trained UNet weights
    optimizer.safetensors   every tensor of the optimizer state (flattened names)
    ema.safetensors         EMA shadow weights (with --use_ema)
    state.safetensors       RNG states and the current epoch's data order (uint8 / int64 tensors)
    state.json              step, data position, LR-scheduler and optimizer scalars, config snapshot, the
                            write `sequence`, the GradScaler state (fp16)
    manifest.json           size and sha256 digest of every other file (run_folder.seal)

A mixture job's checkpoint holds every expert: `expert-<k>/` with those files for expert k (chain order) and
a top `state.json` with the job step (the sum of the experts' steps), the expert count and the config.

It is assembled under a hidden temporary name, every file fsynced and digested, then renamed into place, so a
directory named `checkpoint-<step>` is complete; bytes damaged later are caught by the manifest on resume, and
`latest` falls back to the previous good checkpoint. Weights that are not finite are never written. No pickle
anywhere: tensors go through safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from expertune.config.migrations import CONFIG_VERSION
from expertune.errors import ConfigError, NonFiniteError, StorageError
from expertune.io_utils import atomic_write_json, fsync_path
from expertune.run_folder import (
    abandoned,
    checkpoint_folders,
    checkpoints_dir,
    disk_full_error,
    is_disk_full,
    manifest_problem,
    remove_dir,
    seal,
    set_abandoned,
)
from expertune.train.signals import pause_point

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
NAME = re.compile(r"^checkpoint-(\d+)$")
REQUIRED_FILES = ("unet.safetensors", "optimizer.safetensors", "state.safetensors", "state.json")


@dataclass(frozen=True)
class DataPosition:
    """Where the run is in its data: micro-batches consumed so far, and the epoch and offset (into that
    epoch's order) of the last one consumed. The order itself is a pure function of (seed, epoch)."""

    micro_batches_consumed: int
    epoch: int
    position: int


@dataclass
class TrainingState:
    """The mutable state of a run that a checkpoint captures."""

    step: int
    data: DataPosition
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    generator: torch.Generator
    epoch_order: list[int]
    ema: Any | None = None
    strategy: Any | None = None  # how the UNet is spread over processes (train.strategy); None: one whole copy

    def parallel(self) -> Any:
        from expertune.train.strategy import Replicated

        return self.strategy if self.strategy is not None else Replicated(self.unet, self.optimizer)


def _split_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON with every tensor moved into `tensors` (replaced by {"__tensor__": name}).

    Dicts become {"__items__": [[key, value], ...]} so integer keys (optimizer parameter ids) survive.
    Optimizers keep tensors in odd places (bitsandbytes in its per-parameter state, Prodigy's d in its
    groups): walking the whole state dict stores any of them without pickle.
    """
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous().cpu()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__items__": [[key, _split_tensors(item, f"{path}.{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(item, f"{path}.{index}", tensors) for index, item in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        return {key: _join_tensors(item, tensors) for key, item in value["__items__"]}
    if isinstance(value, list):
        return [_join_tensors(item, tensors) for item in value]
    return value


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _split_tensors(state_dict, "optimizer", tensors)


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    return _join_tensors(meta, tensors)


def _scheduler_state(lr_scheduler: Any) -> dict[str, Any]:
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    return inner.state_dict()


def save_checkpoint(output_dir: Path, state: TrainingState, config_snapshot: dict[str, Any],
                    run_identity: dict[str, Any], snapshot: Any | None = None) -> Path:
    """Write checkpoint-<step> of a one-expert run atomically; a failure (e.g. a full disk) leaves no partial
    checkpoint. `snapshot` holds the full weights and optimizer state gathered beforehand on every process (a
    collective, see train.strategy); without it they are taken from the state's whole UNet and optimizer."""
    return save_job_checkpoint(output_dir, [state], config_snapshot, run_identity, [snapshot])


def save_job_checkpoint(output_dir: Path, states: Sequence[TrainingState], config_snapshot: dict[str, Any],
                        run_identity: dict[str, Any], snapshots: Sequence[Any | None] | None = None,
                        grad_scaler: dict[str, Any] | None = None) -> Path:
    """checkpoint-<job step> holding every expert of the job: one expert's files at the top, or (a mixture)
    `expert-<k>/` with each expert's files and a top `state.json` naming how many there are.

    Refused (NonFiniteError, nothing written) when a weight is not finite. Every file is fsynced and digested
    (manifest.json) before the directory is renamed into place; a full disk is a StorageError naming the path."""
    given = list(snapshots) if snapshots is not None else [None] * len(states)
    taken: list[Any] = [s if s is not None else state.parallel().snapshot() for s, state in zip(given, states)]
    step = sum(state.step for state in states)
    for index, (state, snapshot) in enumerate(zip(states, taken)):
        check_finite(snapshot.weights, state, f"expert {index}" if len(states) > 1 else "the expert", step)
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"checkpoint-{step}"
    job = {"config": config_snapshot, "config_version": CONFIG_VERSION, "run_identity": run_identity,
           "sequence": next_sequence(output_dir), "grad_scaler": grad_scaler}
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=root))
    try:
        if len(states) == 1:
            _write_expert(scratch, states[0], taken[0], job)
        else:
            for index, (state, snapshot) in enumerate(zip(states, taken)):
                folder = scratch / expert_folder(index)
                folder.mkdir()
                _write_expert(folder, state, snapshot, {})
            atomic_write_json(scratch / "state.json", {"format_version": FORMAT_VERSION, "step": step,
                                                       "experts": len(states), **job})
        pause_point("checkpoint-files")
        seal(scratch)
        remove_dir(target)  # a checkpoint of this step from an abandoned branch (or an earlier try)
        os.replace(scratch, target)
        fsync_path(root)
    except Exception as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error("checkpoint", target, _bytes_needed(taken, states)) from None
        if isinstance(error, OSError):
            raise StorageError(f"could not write checkpoint {target}: {error.strerror or error}; no partial "
                               "checkpoint was left. Fix that (or point --output_dir elsewhere) and resume with "
                               "--resume_from_checkpoint latest") from None
        raise
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    left_behind = abandoned(output_dir)
    if target.name in left_behind:
        set_abandoned(output_dir, left_behind - {target.name})
    log.info("saved checkpoint %s", target)
    return target


def check_finite(weights: dict[str, torch.Tensor], state: TrainingState, who: str, step: int) -> None:
    """Refuse weights (or EMA weights) holding NaN or infinity: they must never reach a checkpoint or an export."""
    bad = next((name for name, value in weights.items()
                if type(value) in (torch.Tensor, torch.nn.Parameter)  # a quantised frozen base (torchao) is skipped
                and value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if bad is None and state.ema is not None:
        shadow = state.ema.state_dict()["shadow_params"]
        bad = next((f"EMA weight {i}" for i, value in enumerate(shadow) if not bool(torch.isfinite(value).all())),
                   None)
    if bad is not None:
        raise NonFiniteError(f"the weights of {who} are not finite at step {step} ({bad} holds NaN or infinity): no "
                             "checkpoint or export was written from them. Resume from the last checkpoint "
                             "(--resume_from_checkpoint latest) with a lower --learning_rate or a --max_grad_norm")


def _bytes_needed(snapshots: Sequence[Any], states: Sequence[TrainingState]) -> int:
    weights = sum(v.numel() * v.element_size() for s in snapshots for v in s.weights.values())
    return weights * (3 + sum(state.ema is not None for state in states) // max(1, len(states)))


def next_sequence(output_dir: Path) -> int:
    """The write order of the next checkpoint: one more than any checkpoint in the folder holds."""
    sequences = [int((_read_document(path) or {}).get("sequence") or 0) for path in checkpoint_folders(output_dir)]
    return max(sequences, default=0) + 1


def expert_folder(index: int) -> str:
    """Where expert `index` of a mixture keeps its files inside a checkpoint."""
    return f"expert-{index}"


def _write_expert(directory: Path, state: TrainingState, snapshot: Any | None, job: dict[str, Any]) -> None:
    """One expert's weights, optimizer, RNG, EMA and state.json (with the job's fields `job`) into `directory`."""
    parallel = state.parallel()
    if snapshot is None:
        snapshot = parallel.snapshot()
    save_file({k: v.detach().contiguous().cpu() for k, v in snapshot.weights.items()},
              str(directory / "unet.safetensors"))
    optimizer_tensors, optimizer_meta = _flatten_optimizer(snapshot.optimizer)
    save_file(optimizer_tensors, str(directory / "optimizer.safetensors"))
    rng = {
        "generator": state.generator.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "epoch_order": torch.tensor(state.epoch_order, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{index}"] = cuda_state
    save_file(rng, str(directory / "state.safetensors"))
    ema_meta = None
    if state.ema is not None:
        ema_state = state.ema.state_dict()
        save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(ema_state["shadow_params"])},
                  str(directory / "ema.safetensors"))
        ema_meta = {k: v for k, v in ema_state.items() if k != "shadow_params"}
    document = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "data": vars(state.data),
        "lr_scheduler": _scheduler_state(state.lr_scheduler),
        "optimizer": optimizer_meta,
        "optimizer_layout": parallel.layout,
        "ema": ema_meta,
        **job,
    }
    atomic_write_json(directory / "state.json", document)


def format_version(path: Path) -> Any:
    """The `format_version` in a checkpoint's state.json; None when it cannot be read."""
    document = _read_document(path)
    return None if document is None else document.get("format_version")


def other_format(path: Path) -> str | None:
    """Why a readable checkpoint of another format cannot be resumed (naming both versions), else None."""
    version = format_version(path)
    if version is None or version == FORMAT_VERSION:
        return None
    return (f"checkpoint {path} has checkpoint format_version {version!r}, and this expertune resumes format_version "
            f"{FORMAT_VERSION}: resume it with the expertune version that wrote it, or start a new run")


def is_complete(path: Path) -> bool:
    """All files present with the sizes its manifest gives and state.json readable (a renamed-in checkpoint always
    is, unless damaged later). Digests are checked by `damage` (reading every byte)."""
    document = _read_document(path)
    if document is None or document.get("format_version") != FORMAT_VERSION:
        return False
    if damage(path, digests=False) is not None:
        return False
    count = document.get("experts")
    if count is None:
        return _expert_complete(path, document)
    folders = [path / expert_folder(k) for k in range(int(count))]
    return all((d := _read_document(f)) is not None and _expert_complete(f, d) for f in folders)


def damage(path: Path, *, digests: bool = True) -> str | None:
    """What is wrong with a checkpoint's bytes (naming the file), or None. A checkpoint written before manifests
    (no `sequence` in its state.json) has none to check."""
    document = _read_document(path)
    if document is not None and "sequence" not in document and not (path / "manifest.json").exists():
        return None
    return manifest_problem(path, digests=digests)


def _read_document(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _expert_complete(path: Path, document: dict[str, Any]) -> bool:
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    return document.get("ema") is None or (path / "ema.safetensors").is_file()


def _write_order(path: Path) -> tuple[int, int]:
    document = _read_document(path) or {}
    return int(document.get("sequence") or 0), int(NAME.match(path.name).group(1))  # type: ignore[union-attr]


def list_checkpoints(output_dir: Path, *, with_abandoned: bool = False) -> list[Path]:
    """The complete checkpoints of the run's lineage, oldest written first (abandoned branches left out unless
    asked for). Partial and damaged ones (a crash mid-write, missing or truncated files) are reported and skipped."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    for entry in root.iterdir():
        if entry.name.endswith(".partial"):
            log.warning("ignoring partial checkpoint %s (a write that did not finish)", entry)
    left_behind = set() if with_abandoned else abandoned(output_dir)
    found = []
    for entry in checkpoint_folders(output_dir):
        if entry.name in left_behind:
            continue
        if is_complete(entry):
            found.append(entry)
        elif other_format(entry):
            log.warning("ignoring %s", other_format(entry))
        else:
            problem = damage(entry, digests=False)
            log.warning("ignoring damaged checkpoint %s (%s)", entry, problem or "files missing or unreadable")
    return sorted(found, key=_write_order)


def resume_requested(output_dir: Path, name: str | None) -> bool:
    """Whether the run resumes: `latest` with no complete checkpoint yet starts a fresh run (SimpleTuner's
    RESUME_CHECKPOINT=latest on a first run), and says so; any other name must exist (resolve_checkpoint)."""
    if name is None:
        return False
    if name == "latest" and not list_checkpoints(output_dir):
        log.info("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a fresh run",
                 checkpoints_dir(output_dir))
        return False
    return True


def resolve_checkpoint(output_dir: Path, name: str) -> Path:
    """`latest` → the most recently written checkpoint of the lineage whose digests verify (a damaged newer one
    is skipped with a warning); else a checkpoint name under output_dir or a path, which must verify."""
    if name == "latest":
        complete = list_checkpoints(output_dir)
        for candidate in reversed(complete):
            problem = damage(candidate)
            if problem is None:
                return candidate
            log.warning("checkpoint %s is damaged (%s): falling back to the previous one", candidate, problem)
        raise ConfigError(
            f"--resume_from_checkpoint latest: no complete checkpoint whose digests verify in "
            f"{checkpoints_dir(output_dir)}; start without --resume_from_checkpoint"
        )
    candidate = Path(name) if os.sep in name else checkpoints_dir(output_dir) / name
    if candidate.is_dir() and other_format(candidate):
        raise ConfigError(f"--resume_from_checkpoint {name}: {other_format(candidate)}")
    problem = damage(candidate) if candidate.is_dir() and _read_document(candidate) is not None else None
    if problem is not None:
        raise ConfigError(f"--resume_from_checkpoint {name}: checkpoint {candidate} is damaged: {problem}. Resume "
                          "from another checkpoint (or 'latest', which skips damaged ones)")
    if not candidate.is_dir() or not is_complete(candidate):
        available = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise ConfigError(f"--resume_from_checkpoint {name}: {candidate} is not a complete checkpoint "
                          f"(available: {available}, or 'latest')")
    return candidate


def record_lineage(output_dir: Path, resumed: Path) -> None:
    """A run resuming `resumed` while checkpoints written after it exist: those are an abandoned branch from now
    on (never `latest`, pruned first), so the checkpoints this run writes are its continuation. Resuming a
    checkpoint of an abandoned branch makes that branch the lineage again."""
    if resumed.parent.resolve() != checkpoints_dir(output_dir).resolve():
        return
    left_behind = abandoned(output_dir)
    after = _write_order(resumed)
    newer = {p.name for p in list_checkpoints(output_dir, with_abandoned=True) if _write_order(p) > after}
    if newer - left_behind:
        log.warning("resuming %s while newer checkpoints exist: %s are left behind as an abandoned branch "
                    "(removed by checkpoints_total_limit)", resumed.name, ", ".join(sorted(newer - left_behind)))
    wanted = (left_behind - {resumed.name}) | newer
    if wanted != left_behind:
        set_abandoned(output_dir, wanted)


def read_checkpoint_document(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load_checkpoint(path: Path, states: TrainingState | Sequence[TrainingState]) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, EMA and RNG into the state of each expert of the job (one, or a
    mixture's in chain order); returns the checkpoint's top state.json document."""
    targets = [states] if isinstance(states, TrainingState) else list(states)
    document = read_checkpoint_document(path)
    count = document.get("experts")
    if (count or 1) != len(targets):
        raise ConfigError(f"checkpoint {path} holds {count or 1} expert(s) and this run trains {len(targets)}: resume "
                          "it with the mixture_boundaries that wrote it")
    if count is None:
        _load_expert(path, document, targets[0])
    else:
        for index, state in enumerate(targets):
            folder = path / expert_folder(index)
            _load_expert(folder, read_checkpoint_document(folder), state)
    return document


def _load_expert(path: Path, document: dict[str, Any], state: TrainingState) -> None:
    parallel = state.parallel()
    layout = document.get("optimizer_layout", "torch")
    if layout != parallel.layout:
        raise ConfigError(f"checkpoint {path} keeps its optimizer state as {layout!r}, but this run's engine needs "
                          f"{parallel.layout!r}: resume with the accelerate config (DDP, FSDP or DeepSpeed) that "
                          "wrote it")
    optimizer_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), document["optimizer"])
    parallel.restore(load_file(str(path / "unet.safetensors")), optimizer_state)
    inner = getattr(state.lr_scheduler, "scheduler", state.lr_scheduler)
    inner.load_state_dict(document["lr_scheduler"])
    rng = load_file(str(path / "state.safetensors"))
    state.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    if state.ema is not None:
        if document.get("ema") is None:
            raise ConfigError(f"checkpoint {path} holds no EMA weights but --use_ema is set")
        shadow = load_file(str(path / "ema.safetensors"))
        ema_state = dict(document["ema"])
        ema_state["shadow_params"] = [shadow[str(i)] for i in range(len(shadow))]
        state.ema.load_state_dict(ema_state)
    state.step = int(document["step"])
    state.data = DataPosition(**document["data"])
    state.epoch_order = rng["epoch_order"].tolist()


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete the leftovers of checkpoint writes that a crash interrupted (never a complete checkpoint)."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".checkpoint-") and entry.name.endswith(".partial"):
                log.warning("removing partial checkpoint %s (a write that did not finish)", entry)
                shutil.rmtree(entry, ignore_errors=True)


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete, beyond the `keep` most recently written checkpoints of the lineage, the older ones and every
    abandoned branch. Called only after a new checkpoint is durable, so the one a run resumed from outlives it."""
    if not keep:
        return []
    complete = list_checkpoints(output_dir)
    left_behind = abandoned(output_dir)
    removed = [p for p in checkpoint_folders(output_dir) if p.name in left_behind]
    removed += complete[: max(0, len(complete) - keep)]
    for path in removed:
        remove_dir(path)
        log.info("removed old checkpoint %s (checkpoints_total_limit=%d)", path, keep)
    if left_behind:
        set_abandoned(output_dir, {name for name in left_behind if (checkpoints_dir(output_dir) / name).exists()})
    return removed
