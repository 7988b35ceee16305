"""Helpers of the UI's tests: run folders written the way training writes them, and a live server.

Import them as `from ui_helpers import write_run` (pytest puts tests/ui/ on sys.path)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


def write_run(folder: Path, steps: int, *, finished: bool, images: int = 2, band: tuple[int, int] = (350, 999),
              subbands: int = 4, validate_every: int = 2) -> Path:
    """A run folder like train's: metrics.jsonl (training and validation rows), validation/step_N/*.png and, when
    `finished`, run.json with the expert's description and config."""
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = band
    cuts = [lo + (k * (hi - lo + 1)) // subbands for k in range(subbands + 1)]
    lines = []
    for step in range(0, steps + 1):
        if step:
            lines.append({"epoch": 0, "grad_norm": 1.0 / step, "loss": 0.5 / step, "lr": 1e-4, "samples": 4,
                          "seconds": 0.25, "step": step, "timestep_max": hi, "timestep_min": lo})
        if step % validate_every == 0:
            row: dict[str, object] = {"kind": "validation", "step": step, "seconds": 0.5, "clip/mean": 20.0 + step,
                                      "clip/text_to_image_prompt": 20.0 + step}
            for a, b in zip(cuts, cuts[1:]):
                row[f"eval/loss_{a}_{b - 1}"] = 1.0 / (step + 1) + a / 1000
            row["eval/loss"] = sum(v for k, v in row.items() if k.startswith("eval/loss_")) / subbands  # type: ignore[misc]
            lines.append(row)
            for index in range(images):
                path = folder / "validation" / f"step_{step:06d}" / f"text_to_image_p{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 64), (step * 20 % 255, 80, 40 * index % 255)).save(path)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    if finished:
        expert = {"format_version": 1, "timestep_range": [lo, hi], "num_train_timesteps": 1000,
                  "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "model_type": "full"}
        (folder / "run.json").write_text(json.dumps({
            "format_version": 1, "steps": steps, "expert": expert,
            "config": {"train": {"max_train_steps": steps, "output_dir": str(folder)}, "band": {},
                       "schedule": {"rescale_betas_zero_snr": True}, "validation": {}}}), encoding="utf-8")
    return folder


@dataclass
class Served:
    url: str
    workspace: Path
    app: object
    csrf: str

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
        return self._call(urllib.request.Request(self.url + path, headers=headers or {}))

    def post(self, path: str, body: dict[str, object], csrf: str | None = "page") -> tuple[int, dict[str, object]]:
        headers = {"Content-Type": "application/json"}
        if csrf is not None:
            headers["X-CSRF-Token"] = self.csrf if csrf == "page" else csrf
        return self._call(urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers,
                                                 method="POST"))

    @staticmethod
    def _call(request: urllib.request.Request) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


def serve(workspace: Path) -> Iterator[Served]:
    from expertune.ui.server import make_server

    server, app = make_server(workspace, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Served(url, workspace, app, app.guard.csrf)
    finally:
        server.shutdown()
        app.jobs.close()
        server.server_close()
