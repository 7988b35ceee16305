"""A shared start, then the split, in one job (`--mixture_shared_steps`, docs/mixtures.md).

For the first S job steps one model (the trunk) trains on the union of the bands, [0, N - 1], with the shared
options (`--learning_rate`, `--loss_weighting`, `--ema_decay`) and a learning-rate schedule over those S steps.
The trunk is expert 0 in that phase, so a checkpoint keeps its one format (`expert-<k>/` per expert; the other
experts hold the untouched starting model until the split). At the split (before job step S + 1), every expert
becomes a copy of the trunk — its weights, the optimizer's per-parameter state (Adam's moments and step count),
the EMA weights and update count, the random generator and the data position — and expert 0 becomes an expert of
its own: its band, its settings (learning rate, loss weighting, EMA decay) and a learning-rate schedule over its
own steps, as every other expert has. From there the mixture trains as without a shared start.

Whether the split has happened is a function of the job step alone (it has after step S), so a resume at any step
rebuilds the same objects: before or at S, the trunk; after S, expert 0 in its own form before the checkpoint's
state is loaded into it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from expertune.config.plan import ExpertSettings
from expertune.config.schema import TrainConfig
from expertune.experts import ExpertBand
from expertune.objective.weighting import WeightTable
from expertune.train.optim import build_lr_scheduler

if TYPE_CHECKING:
    from expertune.train.setup import ExpertRun, Run

log = logging.getLogger(__name__)


@dataclass
class SharedStart:
    """The shared phase of a mixture job and what expert 0 becomes after it."""

    steps: int  # job steps of the shared phase (S)
    band: ExpertBand  # expert 0's own band after the split
    training_band: ExpertBand  # the band it trains on after the split (its own, widened by --mixture_overlap)
    settings: ExpertSettings  # expert 0's own settings after the split
    weights: WeightTable  # expert 0's own loss weighting after the split
    total_steps: int  # expert 0's own optimizer steps after the split
    branched: bool = False

    def due(self, job_step: int) -> bool:
        """Whether the split happens before the job step after `job_step`."""
        return not self.branched and job_step >= self.steps


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def become_expert(expert: ExpertRun, start: SharedStart, train: TrainConfig, accelerator: Any) -> None:
    """Turn the trunk (expert 0 of the shared phase) into expert 0 itself: its band, settings, loss weighting, peak
    learning rate and a fresh learning-rate schedule over its own steps."""
    optimizer = _inner(expert.optimizer)
    for group in optimizer.param_groups:
        group["lr"] = start.settings.learning_rate
        group.pop("initial_lr", None)  # the new schedule starts from the expert's own peak
    scheduler = build_lr_scheduler(optimizer, train, start.total_steps, processes=accelerator.num_processes)
    expert.lr_scheduler = accelerator.prepare(scheduler)
    expert.state.lr_scheduler = expert.lr_scheduler
    expert.band, expert.settings, expert.weights = start.band, start.settings, start.weights
    expert.training_band = start.training_band
    expert.total_steps = start.total_steps
    if expert.ema is not None:
        expert.ema.max_decay = start.settings.ema_decay
    start.branched = True


def copy_trunk(trunk: ExpertRun, expert: ExpertRun) -> None:
    """`expert` becomes a copy of the trunk: weights, per-parameter optimizer state, EMA, generator, data position
    (its own optimizer settings, learning-rate schedule and step count stay its own)."""
    expert.trained.load_state_dict(trunk.trained.state_dict())
    source, target = _inner(trunk.optimizer), _inner(expert.optimizer)
    state = copy.deepcopy(source.state_dict()["state"])  # no tensor shared between two experts' moments
    target.load_state_dict({"state": state, "param_groups": target.state_dict()["param_groups"]})
    if trunk.ema is not None and expert.ema is not None:
        expert.ema.shadow = [s.detach().clone().to(expert.ema.device) for s in trunk.ema.shadow]
        expert.ema.updates = trunk.ema.updates
    expert.state.generator.set_state(trunk.state.generator.get_state())
    expert.state.data = trunk.state.data
    expert.state.epoch_order = list(trunk.state.epoch_order)
    expert.layout_epoch = trunk.layout_epoch


def branch(run: Run) -> None:
    """The split, at job step S: every expert a copy of the trunk, expert 0 an expert of its own."""
    start = run.shared
    assert start is not None and run.step == start.steps
    trunk = run.experts[0]
    for expert in run.experts[1:]:
        copy_trunk(trunk, expert)
        expert.stream = run.stream_after(trunk.state.data.micro_batches_consumed)
    become_expert(trunk, start, start.settings.applied_to(run.config.train), run.accelerator)
    log.info("shared start done after %d job steps: %d experts branched from it", start.steps, len(run.experts))

