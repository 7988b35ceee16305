"""`expertune ui`: the HTTP server (Python's ThreadingHTTPServer) of the run list, run pages, compare and jobs.

GET  /                      the page (static/index.html; app.js draws everything from the JSON below)
GET  /api/session           the CSRF token every POST carries (X-CSRF-Token) and the workspace
GET  /api/runs              every run's summary and the jobs
GET  /api/run?path=R        a run: summary, schedule and bands, checkpoints, gallery, config, run.json, samples
GET  /api/metrics?path=R&points=N&version=V   downsampled series (`{"unchanged": true}` while V is current)
GET  /api/image?path=P&w=N  an image of the workspace (a thumbnail when w > 0)
GET  /api/configs           config files in the workspace a run can start from
GET  /api/log?id=J&offset=N a job's log from byte N
POST /api/train {config} · /api/export {run, checkpoint, formats, precision}
     /api/sample {run, checkpoint, prompt, seed, guidance, steps} · /api/cancel {id} · /api/stop {run}
     /api/init {folder, model, layout, gpu_memory, format, data, output}  (expertune init's starter files)
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
import os
import threading
import time
import traceback
from dataclasses import asdict
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from expertune.ui import actions
from expertune.ui.gallery import IMAGE_SUFFIXES, Thumbnails
from expertune.ui.jobs import Job, JobQueue
from expertune.ui.metrics import MetricsReader, chart_data, file_version
from expertune.ui.page import run_page
from expertune.ui.runs import UI_DIR, find_runs, summarize
from expertune.ui.safety import Guard, Refused, inside

log = logging.getLogger(__name__)
STATIC = ("index.html", "app.js", "app.css")
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
MAX_BODY = 65536
RUNS_TTL = 5.0  # seconds between two searches of the workspace for run folders


class UiApp:
    """What every request reads: the workspace, the shared metric reader, thumbnails and the job queue."""

    def __init__(self, workspace: Path, guard: Guard, jobs: JobQueue) -> None:
        self.workspace = workspace.resolve()
        self.guard = guard
        self.reader = MetricsReader()
        self.thumbs = Thumbnails()
        self.jobs = jobs
        self._runs: list[Path] = []
        self._runs_at = -RUNS_TTL
        self._runs_guard = threading.Lock()

    def run_dirs(self) -> list[Path]:
        """The workspace's run folders, searched again at most every RUNS_TTL seconds (a workspace may hold big
        dataset folders; the run list is polled every 2 s)."""
        with self._runs_guard:
            if time.monotonic() - self._runs_at > RUNS_TTL:
                self._runs = find_runs(self.workspace)
                self._runs_at = time.monotonic()
            return list(self._runs)

    def warm(self) -> None:
        """Read every run's metrics once in the background, so the first page opened finds them parsed."""
        for run_dir in self.run_dirs():
            self.reader.read(run_dir / "metrics.jsonl")

    def job_states(self) -> dict[str, tuple[str, str, int | None]]:
        states: dict[str, tuple[str, str, int | None]] = {}
        for job in self.jobs.snapshot():
            if job.verb != "train" or job.run is None:
                continue
            if job.state in ("queued", "running"):
                states[job.run] = (job.state if job.state == "running" else "queued", f"UI job {job.id}",
                                   job.total_steps)
            elif job.state == "failed":
                tail = " | ".join(self.jobs.tail(job, 3))
                states[job.run] = ("failed", f"exit code {job.rc}: {tail}", job.total_steps)
            else:
                states.pop(job.run, None)
        return states

    def job_json(self, job: Job) -> dict[str, object]:
        document = asdict(job)
        document["lane"] = job.lane
        if job.state in ("failed", "stopped"):
            document["tail"] = self.jobs.tail(job)
        return document

    def runs(self) -> dict[str, object]:
        states = self.job_states()
        return {"runs": [summarize(self.workspace, d, self.reader, states).to_json()
                         for d in self.run_dirs()],
                "jobs": [self.job_json(job) for job in reversed(self.jobs.snapshot())]}

    def run(self, relative: str) -> dict[str, object]:
        run_dir = inside(self.workspace, relative)
        if not run_dir.is_dir():
            raise Refused(404, f"{relative}: no such run folder")
        document = run_page(self.workspace, run_dir, self.reader, self.job_states())
        document["samples"] = [self.job_json(job) for job in self.jobs.snapshot()
                               if job.verb == "generate" and job.run == relative]
        return document

    def metrics(self, relative: str, points: int, version: str | None) -> dict[str, object]:
        path = inside(self.workspace, relative) / "metrics.jsonl"
        current = file_version(path)
        if version == current:
            return {"unchanged": True, "version": current}
        return {"version": current, **chart_data(self.reader.read(path), max(10, min(points, 5000)))}

    def configs(self) -> list[str]:
        skip = {"run.json", "expert.json", "mixture.json", "state.json", "manifest.json", "export.json",
                "lineage.json", "workflow_api.json", "jobs.json", "model_index.json", "config.json.partial"}
        found = []
        for folder, names, files in os.walk(self.workspace):
            depth = Path(folder).relative_to(self.workspace).parts
            names[:] = [n for n in names if not n.startswith(".") and n not in
                        ("checkpoints", "validation", "pipeline", "lora", "logs", "exports", "cache", "data")]
            if len(depth) >= 3:
                names[:] = []
            for name in files:
                if name.endswith((".toml", ".env")) or (name.endswith(".json") and name not in skip
                                                        and "config" in name):
                    found.append((Path(folder) / name).relative_to(self.workspace).as_posix())
        return sorted(found)[:200]


def static_file(name: str) -> bytes:
    return resources.files("expertune.ui").joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    app: UiApp
    server_version = "expertune-ui"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    # ---- responses --------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store" if content_type.startswith("application/json") else "max-age=60")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: object, status: int = 200) -> None:
        self._send(status, json.dumps(finite(value), allow_nan=False).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            self.app.guard.check_host(self.headers.get("Host"))
            if not self._authorised():
                return
            work()
        except Refused as refused:
            self._json({"error": refused.reason}, refused.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:  # one bad request never stops the server: report it and carry on
            log.error("ui: %s %s failed:\n%s", self.command, self.path, traceback.format_exc())
            try:
                self._json({"error": f"{type(error).__name__}: {error}"}, 500)
            except OSError:
                pass

    def _authorised(self) -> bool:
        guard = self.app.guard
        if guard.token is None:
            return True
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        query = parse_qs(urlsplit(self.path).query).get("token", [None])[0]
        if not guard.check_token(cookie["expertune_token"].value if "expertune_token" in cookie else None, query):
            self._send(401, b"expertune ui: open the address with the token printed when the UI started\n",
                       "text/plain; charset=utf-8")
            return False
        if query is not None:  # the printed link: keep the token in a cookie and drop it from the address bar
            self._send(303, b"", "text/plain", {"Location": "/", "Set-Cookie":
                       f"expertune_token={guard.token}; HttpOnly; SameSite=Strict; Path=/"})
            return False
        return True

    # ---- GET ----------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._guarded(self._get)

    do_HEAD = do_GET

    def _get(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        app, route = self.app, url.path
        if route in ("/", "/index.html"):
            self._send(200, static_file("index.html"), "text/html; charset=utf-8")
        elif route.startswith("/static/") and route[8:] in STATIC:
            kind = mimetypes.guess_type(route)[0] or "application/octet-stream"
            self._send(200, static_file(route[8:]), f"{kind}; charset=utf-8")
        elif route == "/api/session":
            self._json({"csrf": app.guard.csrf, "workspace": str(app.workspace)})
        elif route == "/api/runs":
            self._json(app.runs())
        elif route == "/api/run":
            self._json(app.run(query.get("path", "")))
        elif route == "/api/metrics":
            self._json(app.metrics(query.get("path", ""), _int(query.get("points"), 600), query.get("version")))
        elif route == "/api/image":
            self._image(query.get("path", ""), _int(query.get("w"), 0))
        elif route == "/api/configs":
            self._json({"configs": app.configs()})
        elif route == "/api/log":
            job = app.jobs.find(query.get("id", ""))
            if job is None:
                raise Refused(404, "no such job")
            text, offset = app.jobs.read_log(job, _int(query.get("offset"), 0))
            self._json({"text": text, "offset": offset, "state": job.state, "rc": job.rc})
        else:
            raise Refused(404, f"{route}: not found")

    def _image(self, relative: str, width: int) -> None:
        path = inside(self.app.workspace, relative)
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise Refused(404, f"{relative}: not an image in the workspace")
        try:
            if width > 0:
                body, kind = self.app.thumbs.get(path, min(width, 2048))
            else:
                body, kind = path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        except (OSError, ValueError) as error:
            raise Refused(404, f"{relative}: unreadable image ({type(error).__name__})") from None
        self._send(200, body, kind)

    # ---- POST ---------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _post(self) -> None:
        app = self.app
        app.guard.check_csrf(self.headers.get("X-CSRF-Token"))
        length = _int(self.headers.get("Content-Length"), 0)
        if length > MAX_BODY:
            raise Refused(400, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            raise Refused(400, "the body must be a JSON object") from None
        route, ws = urlsplit(self.path).path, app.workspace
        text = lambda key: str(body.get(key, ""))  # noqa: E731
        if route == "/api/train":
            job = app.jobs.submit(actions.train_job(ws, text("config")))
        elif route == "/api/export":
            job = app.jobs.submit(actions.export_job(ws, text("run"), text("checkpoint"),
                                                     text("formats") or "diffusers,single_file",
                                                     text("precision") or "fp32"))
        elif route == "/api/sample":
            try:
                seed, guidance, steps = int(body.get("seed", 0)), float(body.get("guidance", 5.0)), \
                    int(body.get("steps", 20))
            except (TypeError, ValueError):
                raise Refused(400, "seed and steps must be whole numbers, guidance a number") from None
            job = app.jobs.submit(actions.sample_job(ws, text("run"), text("checkpoint"), text("prompt"), seed,
                                                     guidance, steps))
        elif route == "/api/cancel":
            found = app.jobs.cancel(text("id"))
            if found is None:
                raise Refused(404, "no such job")
            job = found
        elif route == "/api/init":
            try:
                memory = float(body.get("gpu_memory", 24))
            except (TypeError, ValueError):
                raise Refused(400, "GPU memory must be a number of GiB") from None
            self._json({"written": actions.write_init(ws, text("folder"), text("model") or "ssd-1b",
                                                      text("layout") or "two-stage", memory,
                                                      text("format") or "json", text("data") or "datasets/images",
                                                      text("output") or "output")})
            return
        elif route == "/api/stop":
            self._json({"message": actions.request_stop(ws, text("run"))})
            return
        else:
            raise Refused(404, f"{route}: not found")
        self._json({"job": app.job_json(job)})


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        raise Refused(400, f"{text!r} is not a whole number") from None


def finite(value: object) -> object:
    """`value` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def make_server(workspace: Path, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, UiApp]:
    """The server (not yet serving) and its app; port 0 picks a free port (`server.server_address`)."""
    import expertune.mixture  # noqa: F401  (what a run page needs, torch among it: loaded now, not on the first page)
    import expertune.schedule  # noqa: F401
    import expertune.train.checkpoint  # noqa: F401

    workspace = workspace.resolve()
    (workspace / UI_DIR).mkdir(parents=True, exist_ok=True)
    jobs = JobQueue(workspace)
    jobs.start()  # refuses a second UI on the same workspace
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError:
        jobs.close()
        raise
    server.daemon_threads = True
    app = UiApp(workspace, Guard.for_address(host, server.server_address[1]), jobs)
    server.RequestHandlerClass = type("BoundHandler", (Handler,), {"app": app})
    threading.Thread(target=app.warm, name="expertune-ui-warm", daemon=True).start()
    return server, app
