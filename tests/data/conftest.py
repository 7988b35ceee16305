"""An S3-compatible server on loopback for the `aws` dataset tests: moto's standalone server, in its own process.

`s3_server` starts `python -m moto.server` on a free port once per session. `s3` (per test) sets fake
credentials in the environment for that test only (and hides any ~/.aws files), and gives a client, a
fresh bucket name, and `flaky`: a proxy that fails chosen requests (see s3_server_helpers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from s3_server_helpers import ACCESS_KEY, REGION, SECRET_KEY, S3, FlakyProxy, free_port, start_proxy


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """The endpoint URL of a moto server process on 127.0.0.1 (stopped at the end of the session)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("wb")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start (see {log.name})") from None
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Fake credentials for this test only (no ~/.aws files), a client of the server, and a flaky proxy."""
    import boto3

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.client("s3", endpoint_url=s3_server, region_name=REGION)
    proxy = FlakyProxy(target=s3_server)
    server = start_proxy(proxy)
    yield S3(endpoint=s3_server, client=client, flaky=proxy)
    server.shutdown()
    server.server_close()
