"""The pieces of the S3 test fixtures (tests/data/conftest.py): constants, a free port, a flaky proxy, S3.

`FlakyProxy` is a small HTTP proxy in front of the server that can fail chosen requests (a 503 a retry
must absorb, a body cut short) and records each request's credential.
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ACCESS_KEY = "AKIDEXPERTUNETEST"
SECRET_KEY = "expertune-test-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class FlakyProxy:
    """Forwards to the server; `fail(path_suffix, times, how)` makes the next `times` GETs of a matching path
    fail (`how`: "503" answers Service Unavailable (SlowDown), "STATUS:Code" answers that S3 error, "cut"
    sends half the body then closes)."""

    target: str
    url: str = ""
    rules: dict[str, list[str]] = field(default_factory=dict)
    credentials: list[str] = field(default_factory=list)  # the access key id of every request
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path without the query)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, path_suffix: str, times: int, how: str) -> None:
        with self.lock:
            self.rules[path_suffix] = [how] * times

    def _failure(self, method: str, path: str) -> str | None:
        if method != "GET":
            return None
        with self.lock:
            for suffix, pending in self.rules.items():
                if path.split("?")[0].endswith(suffix) and pending:
                    return pending.pop()
        return None


def start_proxy(proxy: FlakyProxy) -> ThreadingHTTPServer:
    host, port = proxy.target.removeprefix("http://").split(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            auth = self.headers.get("Authorization", "")
            if "Credential=" in auth:
                with proxy.lock:
                    proxy.credentials.append(auth.split("Credential=")[1].split("/")[0])
            with proxy.lock:
                proxy.requests.append((self.command, self.path.split("?")[0]))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            failure = proxy._failure(self.command, self.path)
            if failure is not None and failure != "cut":
                status, code = failure.split(":") if ":" in failure else (failure, "SlowDown")
                payload = f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>".encode()
                self.send_response(int(status))
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            upstream = http.client.HTTPConnection(host, int(port), timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            length_header = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length_header or str(len(data)))
            if failure == "cut":
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


_buckets = itertools.count()


@dataclass
class S3:
    endpoint: str
    client: object
    flaky: FlakyProxy

    def bucket(self, name: str = "data") -> str:
        """A new, empty bucket with a name no other test uses."""
        bucket = f"expertune-{name}-{next(_buckets)}-{os.getpid()}"
        self.client.create_bucket(Bucket=bucket)
        return bucket

    def upload(self, bucket: str, folder: Path, prefix: str = "") -> list[str]:
        """Every file under `folder`, as `prefix` + its relative path; the keys, sorted."""
        keys = []
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = prefix + path.relative_to(folder).as_posix()
                self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
                keys.append(key)
        return keys


