"""SIGINT / SIGTERM during training (or the file `stop_requested` in output_dir, which `expertune ui` writes):
finish the current step, save a checkpoint, exit cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)


class StopRequests:
    """Records a SIGINT/SIGTERM instead of dying mid-step; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    STOP_FILE = "stop_requested"

    def __init__(self, output_dir: Path | None = None) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._file = None if output_dir is None else Path(output_dir) / self.STOP_FILE

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: finishing this step and saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        if self.received is None and self._file is not None and self._file.exists():
            log.warning("%s found: finishing this step and saving a checkpoint", self._file)
            self.received = signal.SIGTERM
        return self.received is not None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)  # honoured (or the run ended): not for the next run
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()


PAUSE_AT = "EXPERTUNE_TEST_PAUSE_AT"  # tests only: a phase name (see `pause_point`) ...
PAUSE_MARK = "EXPERTUNE_TEST_PAUSE_MARK"  # ... and a file created when the process reaches it


def pause_point(phase: str) -> None:
    """A named moment (e.g. "checkpoint-files", "export") where a test can make the process wait, so that a kill
    it sends lands exactly there: when EXPERTUNE_TEST_PAUSE_AT names `phase`, the first time the process gets
    there it creates the file EXPERTUNE_TEST_PAUSE_MARK and sleeps. Nothing else reads these variables."""
    import os
    import time
    from pathlib import Path

    if os.environ.get(PAUSE_AT) != phase or phase in _paused:
        return
    _paused.add(phase)
    mark = os.environ.get(PAUSE_MARK)
    if mark:
        Path(mark).write_text(phase, encoding="utf-8")
    time.sleep(float(os.environ.get("EXPERTUNE_TEST_PAUSE_SECONDS", "60")))


_paused: set[str] = set()


NONFINITE_AT = "EXPERTUNE_TEST_NONFINITE_AT"  # tests only: "rank:step[,rank:step]" (see `injected_nonfinite`)


def injected_nonfinite(rank: int, step: int) -> bool:
    """Whether a test asked (EXPERTUNE_TEST_NONFINITE_AT) for process `rank`'s loss at job step `step` to count
    as non-finite, once: how the tests show that every process skips a step when one of them sees a NaN."""
    import os

    wanted = {item.strip() for item in os.environ.get(NONFINITE_AT, "").split(",") if item.strip()}
    key = f"{rank}:{step}"
    if key not in wanted or key in _injected:
        return False
    _injected.add(key)
    return True


_injected: set[str] = set()
