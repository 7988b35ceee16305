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
