"""Facts about the process a run executes in: devices, ranks, memory, library versions."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from expertune.config.schema import Config


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def agreed(accelerator: Any, flag: bool) -> bool:
    """True on every rank when any rank's flag is set (ranks must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, and peak allocated accelerator memory where there is one."""
    import resource

    peaks = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        peaks["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return peaks


def tracker_config(config: Config) -> dict[str, Any]:
    flat = config.flat()
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    import expertune

    return {
        "expertune": expertune.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
