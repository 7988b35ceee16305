"""When a run validates: at startup (on request), every `validation_step_interval` steps, after the export.

In a mixture every expert is validated its own way at each validation, the whole chain of the current
experts is validated too (by the first expert's validator), and the held-out loss of the mixture, each
timestep scored by the expert that owns it, is logged as `eval/mixture_loss`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertune.config import Config
from expertune.train.offload import weights_on
from expertune.train.setup import ExpertRun, Run
from expertune.train.signals import pause_point


class PeriodicValidation:
    """Decides whether a validation is due and runs the experts' validators (main process; a sharded UNet is
    first gathered into one copy, with every rank taking part)."""

    def __init__(self, config: Config, accelerator: Any, total_steps: int) -> None:
        self.v = config.validation
        self.accelerator = accelerator
        self.total_steps = total_steps

    def at_startup(self, run: Run) -> None:
        if self.v.validation_on_startup:
            self.run(run, run.step)

    def maybe_run(self, run: Run) -> None:
        """The interval validation; the last step is validated by `final` after the export."""
        step, interval = run.step, self.v.validation_step_interval
        if interval and step % interval == 0 and step < self.total_steps:
            self.run(run, step)

    def run(self, run: Run, step: int) -> None:
        if self.v.validation_disable:
            return
        unets = [self._whole(expert) for expert in run.experts]
        if all(unet is not None for unet in unets):
            offloaded = run.config.mixture.mixture_offload_inactive and len(unets) > 1
            with weights_on(unets if offloaded else [], self.accelerator.device):
                pause_point("validation")
                self._validate(run, unets, step)
        del unets
        if any(expert.strategy.sharded for expert in run.experts):
            self.accelerator.wait_for_everyone()

    def _whole(self, expert: ExpertRun) -> Any | None:
        strategy = expert.strategy
        return strategy.unet if not strategy.sharded else strategy.whole_unet(self.accelerator.device)

    def _validate(self, run: Run, unets: list[Any], step: int) -> list[Path]:
        written: list[Path] = []
        for expert, unet in zip(run.experts, unets):
            if expert.validator.chain:  # the first expert of a mixture draws the chain, with the later experts' UNets
                written += expert.validator.run(unet, step, unets[1:])
            else:
                written += expert.validator.run(unet, step)
        if run.is_mixture and run.is_main:
            log_mixture_loss(run, step)
        return written

    def final(self, run: Run, unets: list[Any | None]) -> list[Path]:
        """Validate the exported weights (`unets`: each expert's whole UNet on the main process, None elsewhere)."""
        whole = [unet for unet in unets if unet is not None]
        if len(whole) < len(unets):
            return []
        offloaded = run.config.mixture.mixture_offload_inactive and len(whole) > 1
        with weights_on(whole if offloaded else [], self.accelerator.device):
            return self._validate(run, whole, self.total_steps)


def mixture_loss(parts: list[tuple[int, float]], num_train_timesteps: int) -> float:
    """The held-out loss over the whole schedule from each expert's loss over its own band: the mean over
    timesteps, so each band counts by its size. `parts`: (band size, the expert's mean loss over its band)."""
    return sum(size * loss for size, loss in parts) / num_train_timesteps


def log_mixture_loss(run: Run, step: int) -> None:
    values = [expert.validator.last_values.get("eval/loss") for expert in run.experts]
    if any(value is None for value in values):
        return
    loss = mixture_loss([(e.band.size, float(v)) for e, v in zip(run.experts, values)],  # type: ignore[arg-type]
                        run.schedule.num_train_timesteps)
    run.accelerator.log({"eval/mixture_loss": loss}, step=step)
    run.metrics.write({"step": step, "kind": "validation", "expert": "mixture", "eval/mixture_loss": loss})
