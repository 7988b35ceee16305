"""When the checkpointer says a checkpoint is due (step and epoch intervals, each only when set)."""

from __future__ import annotations

from expertune.train.checkpointer import Checkpointer


def _checkpointer(step_interval: int | None, epoch_interval: int | None) -> Checkpointer:
    checkpointer = Checkpointer.__new__(Checkpointer)  # `due` reads the two intervals only (no run needed)
    checkpointer.step_interval, checkpointer.epoch_interval = step_interval, epoch_interval
    return checkpointer


def test_checkpoints_are_due_by_step_or_epoch_interval() -> None:
    by_step = _checkpointer(3, None)
    assert [s for s in range(1, 10) if by_step.due(s, epoch_done=False, epoch=0)] == [3, 6, 9]
    by_epoch = _checkpointer(None, 2)
    assert [e for e in range(6) if by_epoch.due(100, epoch_done=True, epoch=e)] == [1, 3, 5]
    assert not by_epoch.due(100, epoch_done=False, epoch=1)  # only at the end of an epoch
    both = _checkpointer(4, 1)
    assert both.due(4, epoch_done=False, epoch=0) and both.due(5, epoch_done=True, epoch=0)
    assert not both.due(5, epoch_done=False, epoch=0)
    never = _checkpointer(None, None)
    assert not any(never.due(s, epoch_done=True, epoch=s) for s in range(1, 20))
