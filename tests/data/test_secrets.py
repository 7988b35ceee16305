"""No secret leaves a run (issue 20): sentinel values planted in config.env, the environment and the dataloader
JSON are looked for in everything a `-v` training job with every tracker prints and writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SENTINELS = {
    "HF_TOKEN": "hf_SENTINELhftoken0001",  # config.env
    "WANDB_API_KEY": "SENTINELwandbkey0000000000000000000000002",  # config.env
    "AWS_SESSION_TOKEN": "SENTINELsessiontoken0003",  # the environment
    "MY_SERVICE_PASSWORD": "SENTINELpassword0004",  # the environment
    "aws_access_key_id": "AKIASENTINELKEYID0005",  # the dataloader JSON
    "aws_secret_access_key": "SENTINELsecretaccesskey0006",  # the dataloader JSON
}


def _leaks(text: str) -> list[str]:
    return [name for name, value in SENTINELS.items() if value in text]


@pytest.mark.integration
def test_no_secret_is_printed_logged_or_written(s3, tmp_path: Path, tiny_model_dir: Path) -> None:
    from helpers import FAST_FLAGS, write_stage_env
    from test_s3 import _images, _loader

    bucket = s3.bucket()
    s3.upload(bucket, _images(tmp_path / "images", 2))
    loader = _loader(tmp_path, {"aws_bucket_name": bucket, "aws_endpoint_url": s3.endpoint,
                                "aws_access_key_id": SENTINELS["aws_access_key_id"],
                                "aws_secret_access_key": SENTINELS["aws_secret_access_key"]})
    output = tmp_path / "run"
    env_file = write_stage_env(tmp_path, 1, tiny_model_dir, output, loader)
    with env_file.open("a") as stream:
        stream.write(f'\nexport HF_TOKEN="{SENTINELS["HF_TOKEN"]}"\nexport WANDB_API_KEY={SENTINELS["WANDB_API_KEY"]}\n'
                     "export WANDB_MODE=offline\n")
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "AWS_SESSION_TOKEN": SENTINELS["AWS_SESSION_TOKEN"],
               "MY_SERVICE_PASSWORD": SENTINELS["MY_SERVICE_PASSWORD"], "WANDB_SILENT": "true",
               "XDG_CACHE_HOME": str(tmp_path / "xdg"), "WANDB_DIR": str(tmp_path / "wandb-dir")}
    done = subprocess.run([sys.executable, "-m", "expertune.cli", "-v", "train", "--env", str(env_file), *FAST_FLAGS,
                           "--max_train_steps=2", "--report_to=all", "--checkpoint_step_interval=1"],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=600)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    assert "config.env sets HF_TOKEN=<redacted>" in printed  # the line is still there, without the value
    assert "DEBUG" in printed and "botocore" not in " ".join(l for l in printed.splitlines() if " DEBUG " in l)
    assert _leaks(printed) == []
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path != env_file and path != loader]
    assert any(path.name == "run.json" for path in written) and any("tfevents" in path.name for path in written)
    leaks = {str(path.relative_to(tmp_path)): _leaks(path.read_bytes().decode("latin-1")) for path in written}
    assert {path: names for path, names in leaks.items() if names} == {}
    assert json.loads((output / "run.json").read_text())  # it is there, and readable
