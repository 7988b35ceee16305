"""The checkpointer of a run: decides when a checkpoint is due and saves it (every process calls it)."""

from __future__ import annotations

from expertune.errors import ExpertuneError, StorageError
from expertune.hub_upload import push_checkpoint
from expertune.train.checkpoint import prune_checkpoints, save_job_checkpoint
from expertune.train.runtime import agreed
from expertune.train.setup import Run
from expertune.train.signals import pause_point


class Checkpointer:
    """Saves `checkpoint-<step>` (every expert of the job in one) by step or epoch interval, on a stop
    request, and once at the end. Steps are job steps: in a mixture, each trains one expert."""

    def __init__(self, run: Run) -> None:
        self.run = run
        t = run.config.train
        self.step_interval = t.checkpoint_step_interval
        self.epoch_interval = t.checkpoint_epoch_interval
        self.enabled = bool(self.step_interval or self.epoch_interval)
        self.last_saved: int | None = run.step if run.checkpoint_path is not None else None

    def due(self, step: int, epoch_done: bool, epoch: int) -> bool:
        by_step = self.step_interval is not None and step % self.step_interval == 0
        by_epoch = self.epoch_interval is not None and epoch_done and (epoch + 1) % self.epoch_interval == 0
        return by_step or by_epoch

    def maybe_save(self, epoch_done: bool, epoch: int, *, stopping: bool = False) -> None:
        """Save when an interval says so or the run is stopping."""
        if stopping or self.due(self.run.step, epoch_done, epoch):
            self.save()

    def save_final(self) -> None:
        """The last step's checkpoint, unless checkpoints are off or it was just saved."""
        self.run.accelerator.wait_for_everyone()
        if self.enabled and self.last_saved != self.run.step:
            self.save()

    def save(self) -> None:
        """checkpoint-<step> (main process), then the older ones beyond checkpoints_total_limit. A checkpoint that
        cannot be written (full disk, non-finite weights) stops every rank with the main process's error."""
        run = self.run
        snapshots = [expert.strategy.snapshot() for expert in run.experts]  # every rank: a collective when sharded
        failure: ExpertuneError | None = None
        if run.is_main:
            scaler = getattr(run.accelerator, "scaler", None)
            try:
                saved = save_job_checkpoint(run.output_dir, [e.state for e in run.experts], run.config_snapshot,
                                            run.identity, snapshots,
                                            grad_scaler=scaler.state_dict() if scaler else None)
                pause_point("checkpoint-prune")
                prune_checkpoints(run.output_dir, run.config.train.checkpoints_total_limit)
            except ExpertuneError as error:
                failure = error
            else:
                push_checkpoint(saved, run.config)  # --push_checkpoints_to_hub; a failed upload only warns
        if agreed(run.accelerator, failure is not None):
            raise failure or StorageError("the main process could not write a checkpoint (see its log)")
        run.accelerator.wait_for_everyone()
        self.last_saved = run.step
