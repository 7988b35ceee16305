"""`expertune report RUN_DIR -o report.html`: the run page as one self-contained file.

The page is the UI's own (static/app.css and app.js, inlined) drawing the same data as `GET /api/run` and
`GET /api/metrics`, embedded as JSON, with every gallery image downscaled and inlined as a data: URI. It makes no
request: no server, no network, nothing outside the file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from expertune.errors import ConfigError
from expertune.io_utils import atomic_write_bytes
from expertune.ui.gallery import encode_thumbnail
from expertune.ui.metrics import MetricsReader, chart_data
from expertune.ui.page import run_page
from expertune.ui.server import finite, static_file


def _inline(text: str) -> str:
    """Text safe inside a <script> or <style> element."""
    return text.replace("</", "<\\/")


def report_data(run_dir: Path, image_width: int = 256) -> dict[str, object]:
    """The run page's data with the images as data: URIs (JPEG, at most `image_width` px wide)."""
    run_dir = run_dir.resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"report: {run_dir} is not a folder; give a run's output_dir")
    workspace = run_dir.parent
    reader = MetricsReader()
    page = run_page(workspace, run_dir, reader)
    if page["summary"]["state"] == "damaged":  # type: ignore[index]
        raise ConfigError(f"report: {run_dir} cannot be read: {page['summary']['detail']}")  # type: ignore[index]
    if not (run_dir / "metrics.jsonl").exists() and not (run_dir / "run.json").exists():
        raise ConfigError(f"report: {run_dir} holds no metrics.jsonl or run.json; give a training run's output_dir")
    inlined: dict[str, str] = {}
    gallery = page.get("gallery")
    for group in (gallery or {}).get("groups", []):  # type: ignore[attr-defined]
        for row in group["rows"]:
            for relative in row["cells"].values():
                try:
                    body, kind = encode_thumbnail(workspace / relative, image_width, jpeg=True)
                except (OSError, ValueError):
                    continue  # an unreadable image shows as missing
                inlined[relative] = f"data:{kind};base64,{base64.b64encode(body).decode('ascii')}"
    page["images"] = inlined
    page["metrics"] = chart_data(reader.read(run_dir / "metrics.jsonl"), 1000)
    return page


def write_report(run_dir: Path, out: Path, image_width: int = 256) -> Path:
    """Write the report of `run_dir` to `out` (atomically) and return its path."""
    if image_width < 16:
        raise ConfigError(f"report: --image_width {image_width} is too small; use 16 or more (default 256)")
    data = json.dumps(finite(report_data(Path(run_dir), image_width)), allow_nan=False)
    html = static_file("index.html").decode("utf-8")
    html = html.replace('<link rel="stylesheet" href="/static/app.css">',
                        f"<style>{_inline(static_file('app.css').decode('utf-8'))}</style>")
    html = html.replace('<script src="/static/app.js"></script>',
                        f'<script id="report-data" type="application/json">{_inline(data)}</script>\n'
                        f"<script>{_inline(static_file('app.js').decode('utf-8'))}</script>")
    if "report-data" not in html or "/static/" in html:
        raise RuntimeError("static/index.html no longer has the lines the report replaces")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, html.encode("utf-8"))
    out.chmod(0o644)  # a file to share
    return out
