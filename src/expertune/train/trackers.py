"""Metric trackers through accelerate: TensorBoard, Weights & Biases, both (`all`), or none.

W&B never fails a run: without credentials (no WANDB_API_KEY, no `wandb login`) it runs offline and says
how to upload later (`wandb sync DIR`); when an online start fails (no network, bad key) it retries
offline; when even that fails, or wandb is not installed, the run goes on without it and says so.

Validation (validate/samples.py) logs its images through accelerate's tracker interface (`log_images`,
`log_table`); here they become W&B images, and a W&B table whose image cells are W&B images.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from accelerate.tracking import WandBTracker

from expertune.config import Config

if TYPE_CHECKING:  # wandb is imported only when a run reports to it
    from wandb.sdk.wandb_run import Run as WandbRun

log = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled"]
# WANDB_MODE values that decide the mode themselves (dryrun is wandb's older name of offline).
_FORCED_MODES: dict[str, WandbMode] = {"disabled": "disabled", "dryrun": "offline", "offline": "offline"}


def wandb_credentials_present() -> bool:
    """An API key in the environment, or a `wandb login` entry in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class ResilientWandBTracker(WandBTracker):
    """accelerate's W&B tracker, started offline where online cannot work, and silent where nothing can."""

    def __init__(self, project: str, **init_kwargs: Any) -> None:
        super().__init__(project, **init_kwargs)
        self.run: WandbRun | None = None
        self.mode: str | None = None

    def start(self) -> None:  # accelerate calls it on the main process only (init_trackers there)
        try:
            import wandb
        except ImportError:
            log.warning("--report_to wandb: the wandb package is not installed (pip install wandb); training "
                        "goes on without W&B")
            return
        requested = os.environ.get("WANDB_MODE", "").lower()
        modes: list[WandbMode]
        if requested in _FORCED_MODES:
            modes = [_FORCED_MODES[requested]]
        elif not wandb_credentials_present():
            log.warning("--report_to wandb: no W&B credentials (WANDB_API_KEY or `wandb login`): logging offline")
            modes = ["offline"]
        else:
            modes = ["online", "offline"]
        for mode in modes:
            try:
                self.run = wandb.init(project=self.run_name, mode=mode, **self.init_kwargs)
                self.mode = mode
                break
            except Exception as error:  # wandb raises many kinds (CommError, UsageError, timeouts): none may stop training
                log.warning("--report_to wandb: starting W&B %s failed (%s: %s)", mode, type(error).__name__, error)
        if self.run is None:
            log.warning("--report_to wandb: W&B could not start; training goes on without it")
            return
        if self.mode == "offline":
            folder = getattr(getattr(self.run, "settings", None), "sync_dir", None) or self.init_kwargs.get("dir")
            log.info("W&B logs offline to %s; upload them later with: wandb sync %s", folder, folder)

    @property
    def tracker(self) -> Any:
        return self.run

    def store_init_configuration(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.log(values, step=step, **kwargs)

    def log_images(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: [wandb.Image(image) for image in images] for key, images in values.items()},
                     step=step, **kwargs)

    def log_table(self, table_name: str, columns: list[str] | None = None, data: list[list[Any]] | None = None,
                  dataframe: Any = None, step: int | None = None, **kwargs: Any) -> None:
        """accelerate's table, with PIL images in `data` turned into W&B images (validation's prompt/step table)."""
        if self.run is None:
            return
        import wandb
        from PIL import Image

        rows = [[wandb.Image(cell) if isinstance(cell, Image.Image) else cell for cell in row] for row in data or []]
        header: list[str | int] | None = None if columns is None else list(columns)
        self.run.log({table_name: wandb.Table(columns=header, data=rows or None, dataframe=dataframe)},
                     step=step, **kwargs)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def log_with(config: Config, logging_dir: Path) -> list[Any] | None:
    """What `Accelerator(log_with=...)` gets for `report_to`: tensorboard, wandb, all (both) or none."""
    report_to = config.logging.report_to
    if report_to == "none":
        return None
    trackers: list[Any] = []
    if report_to in ("tensorboard", "all"):
        trackers.append("tensorboard")
    if report_to in ("wandb", "all"):
        lg = config.logging
        # W&B's own WANDB_DIR wins, read at each run (wandb caches its settings once per process).
        folder = Path(os.environ.get("WANDB_DIR") or logging_dir)
        folder.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"dir": str(folder)}
        if lg.tracker_run_name:
            kwargs["name"] = lg.tracker_run_name
        trackers.append(ResilientWandBTracker(lg.tracker_project_name, **kwargs))
    return trackers


def init_trackers(accelerator: Any, config: Config, values: dict[str, Any]) -> None:
    """Start the trackers (main process): TensorBoard logs under logging_dir/<run name>; W&B in the project
    tracker_project_name, run tracker_run_name, files under logging_dir."""
    run_name = config.logging.tracker_run_name or config.logging.tracker_project_name
    accelerator.init_trackers(run_name, config=values)
