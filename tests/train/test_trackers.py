"""W&B through accelerate never fails a run: offline without credentials, silent when it cannot start."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from expertune.config import Config
from expertune.train import trackers
from expertune.train.trackers import ResilientWandBTracker, log_with, wandb_credentials_present


@pytest.fixture()
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    return tmp_path / "wandb"


def test_credentials_come_from_the_environment_or_netrc(tmp_path: Path, monkeypatch, no_credentials) -> None:
    assert not wandb_credentials_present()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_credentials_present()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_present()


def test_without_credentials_wandb_logs_offline_and_says_how_to_sync(no_credentials: Path, caplog) -> None:
    (tracker,) = [t for t in log_with(Config.from_flat({"report_to": "wandb", "tracker_run_name": "run-1"}),
                                      no_credentials.parent / "logs") if not isinstance(t, str)]
    assert tracker.init_kwargs["dir"] == str(no_credentials)  # WANDB_DIR, read at each run
    with caplog.at_level(logging.INFO, logger="expertune.train"):
        tracker.start()  # no WANDB_MODE: it must not try to reach the network without credentials
    try:
        assert tracker.mode == "offline" and tracker.run is not None
        tracker.store_init_configuration({"learning_rate": 1e-6})
        tracker.log({"train/loss": 0.5}, step=1)
    finally:
        tracker.finish()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no W&B credentials" in text and "wandb sync" in text
    assert any(no_credentials.rglob("*.wandb"))


def test_a_wandb_that_cannot_start_never_stops_training(no_credentials: Path, monkeypatch, caplog) -> None:
    import wandb

    def broken(**kwargs):
        raise RuntimeError("no network, no disk, nothing")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setattr(trackers, "wandb_credentials_present", lambda: True)
    tracker = ResilientWandBTracker("expertune-test")
    with caplog.at_level(logging.WARNING, logger="expertune.train"):
        tracker.start()
    tracker.log({"train/loss": 0.5}, step=1)
    tracker.store_init_configuration({"a": 1})
    tracker.finish()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "starting W&B online failed" in text and "starting W&B offline failed" in text
    assert "goes on without it" in text


def test_report_to_chooses_the_trackers(tmp_path: Path, no_credentials) -> None:
    def names(report_to: str):
        chosen = log_with(Config.from_flat({"report_to": report_to, "tracker_run_name": "r"}), tmp_path / "logs")
        return None if chosen is None else [t if isinstance(t, str) else t.name for t in chosen]

    assert names("none") is None
    assert names("tensorboard") == ["tensorboard"]
    assert names("wandb") == ["wandb"]
    assert names("all") == ["tensorboard", "wandb"]
