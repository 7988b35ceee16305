"""When a run validates: at startup (on request), every `validation_step_interval` steps, after the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertune.config import Config
from expertune.train.setup import ExpertRun


class PeriodicValidation:
    """Decides whether a validation is due and runs the expert's validator (main process; a sharded UNet is
    first gathered into one copy, with every rank taking part)."""

    def __init__(self, config: Config, accelerator: Any, total_steps: int) -> None:
        self.v = config.validation
        self.accelerator = accelerator
        self.total_steps = total_steps

    def at_startup(self, expert: ExpertRun) -> None:
        if self.v.validation_on_startup:
            self.run(expert, expert.state.step)

    def maybe_run(self, expert: ExpertRun) -> None:
        """The interval validation; the last step is validated by `final` after the export."""
        step, interval = expert.state.step, self.v.validation_step_interval
        if interval and step % interval == 0 and step < self.total_steps:
            self.run(expert, step)

    def run(self, expert: ExpertRun, step: int) -> None:
        if self.v.validation_disable:
            return
        strategy = expert.strategy
        if not strategy.sharded:
            expert.validator.run(strategy.unet, step)
            return
        whole = strategy.whole_unet(self.accelerator.device)
        if whole is not None:
            expert.validator.run(whole, step)
            del whole
        self.accelerator.wait_for_everyone()

    def final(self, expert: ExpertRun, unet: Any | None) -> list[Path]:
        """Validate the exported weights (`unet`: the whole UNet on the main process, None elsewhere)."""
        return expert.validator.run(unet, self.total_steps) if unet is not None else []
