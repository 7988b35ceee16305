"""Sampler choice at inference, built from each expert's saved scheduler config.

A saved expert's `scheduler/scheduler_config.json` carries the parameterisation it was trained under
(`prediction_type`, `rescale_betas_zero_snr`, `timestep_spacing`, `num_train_timesteps`, betas). Swapping
the sampler class keeps that config, so the parameterisation carries over; a class that would drop one of
those keys is refused rather than run with its own default.

The hand-off between experts (REFERENCE.md §4, diffusers issue 5447): a scheduler of `order == 2` (Heun,
KDPM2) visits every timestep but the first twice, and a cut between the two halves of a step ruins the
image; diffusers' SDXL pipelines add one step at `denoising_start` for such schedulers. None of the
choices here is of order 2. The multistep solvers (`unipc`, `dpm++`) keep a history of model outputs,
which belongs to one expert's UNet: at each hand-off the next expert's solver starts afresh, so its first
step is first order (and UniPC's corrector is not applied to the handed-over sample).
`handoff_timesteps` says which inference timesteps each expert runs; tests check they tile the schedule.
"""

from __future__ import annotations

import inspect
from typing import Any

from expertune.errors import ConfigError, ModelError
from expertune.experts import ExpertBand

SCHEDULER_CLASSES: dict[str, str] = {
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",  # DPM-Solver++ 2M
}
CARRIED_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "num_train_timesteps",
                "beta_schedule", "beta_start", "beta_end")


def scheduler_from_saved(choice: str, saved: Any, source: str = "expert") -> Any:
    """A scheduler of the class `choice` names, from a saved scheduler (or its config).

    `choice` "saved" returns `saved` unchanged. Raises ConfigError for an unknown choice and ModelError
    when the new class does not keep one of the parameterisation keys.
    """
    import diffusers

    if choice == "saved":
        return saved
    if choice not in SCHEDULER_CLASSES:
        raise ConfigError(f"--scheduler {choice!r} is not one of: saved, {', '.join(SCHEDULER_CLASSES)}")
    config = dict(saved.config if hasattr(saved, "config") else saved)
    scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[choice])
    scheduler = scheduler_class.from_config(config)
    # diffusers copies keys a class does not take into its `.config` and ignores them: check the signature.
    accepted = inspect.signature(scheduler_class.__init__).parameters
    for key in CARRIED_KEYS:
        if key in config and (key not in accepted or scheduler.config.get(key) != config[key]):
            has = scheduler.config.get(key) if key in accepted else "no such option"
            raise ModelError(
                f"scheduler {choice} does not keep {key} of {source}: saved {config[key]!r}, "
                f"{SCHEDULER_CLASSES[choice]} has {has!r}; choose another --scheduler"
            )
    return scheduler


def handoff_slice(scheduler: Any, num_inference_steps: int, band: ExpertBand) -> slice:
    """Which of `scheduler.timesteps` (after `set_timesteps`) the expert of `band` runs in a chain, as
    diffusers' SDXL pipelines pick them: the one hand-off rule of the project (chains and validation).

    The first expert keeps `t >= round(N - denoising_end * N)`; a later one keeps `t < round(N -
    denoising_start * N)`, plus one for a scheduler of order 2 when the count is even.
    """
    scheduler.set_timesteps(num_inference_steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    n = scheduler.config.num_train_timesteps
    start, stop = 0, len(timesteps)
    if band.denoising_start is not None:
        cutoff = int(round(n - band.denoising_start * n))
        count = sum(t < cutoff for t in timesteps)
        if scheduler.order == 2 and count % 2 == 0:
            count += 1
        start = max(0, len(timesteps) - count)
    if band.denoising_end is not None:
        cutoff = int(round(n - band.denoising_end * n))
        stop = start + sum(t >= cutoff for t in timesteps[start:])
    return slice(start, stop)


def handoff_timesteps(scheduler: Any, num_inference_steps: int, band: ExpertBand) -> list[int]:
    """The inference timesteps the expert of `band` runs in a chain (see `handoff_slice`)."""
    chosen = handoff_slice(scheduler, num_inference_steps, band)
    return [int(t) for t in scheduler.timesteps[chosen]]
