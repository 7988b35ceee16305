"""`expertune ui` speed: how fast a big run's page opens, and how soon a new metrics line reaches it.

Writes a synthetic run the way training writes one: `--steps` training rows in metrics.jsonl (100,000 by
default), a validation every `--every` steps with four held-out sub-bands and CLIP scores, and `--images`
validation PNGs of `--size` px (500 by default) spread over those validations. Then, against a fresh server
(nothing cached):

- API: the requests the page makes on opening (`/api/run`, then `/api/metrics`: the whole file parsed once and
  downsampled), and a second open (the file is then only read from where it ended);
- live update: a line appended to metrics.jsonl until `/api/metrics` polled every 50 ms returns it;
- browser (with Debian's chromium and selenium): navigation to a drawn run page (charts, schedule and the
  gallery's first images), and appended line to the page showing its step (the page polls every second).

    python bench/ui_speed.py                     # 100,000 steps, 500 images of 256 px
    python bench/ui_speed.py --steps 20000 --images 100 --no-browser
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def write_run(folder: Path, steps: int, every: int, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    validations = list(range(0, steps + 1, every))
    per_validation = max(1, -(-images // len(validations)))
    lines = []
    for step in range(0, steps + 1):
        if step:
            lines.append(json.dumps({"epoch": step // 1000, "grad_norm": float(1 + rng.random()), "loss":
                                     float(0.1 + 0.05 * rng.random()), "lr": 1e-4, "samples": 8, "seconds": 0.4,
                                     "step": step, "timestep_max": 999, "timestep_min": 350}))
        if step % every == 0:
            row = {"kind": "validation", "step": step, "seconds": 3.0, "clip/mean": 25.0}
            for lo, hi in ((350, 511), (512, 674), (675, 836), (837, 999)):
                row[f"eval/loss_{lo}_{hi}"] = float(0.2 + rng.random() * 0.01)
            for k in range(per_validation):
                row[f"clip/text_to_image_p{k}"] = 25.0
            lines.append(json.dumps(row))
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written = 0
    for step in validations:
        for k in range(per_validation):
            if written == images:
                break
            path = folder / "validation" / f"step_{step:06d}" / f"text_to_image_p{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            field = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC).save(path)
            written += 1
    expert = {"format_version": 1, "timestep_range": [350, 999], "num_train_timesteps": 1000,
              "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    (folder / "run.json").write_text(json.dumps({"format_version": 1, "steps": steps, "expert": expert, "config": {
        "train": {"max_train_steps": steps}, "schedule": {"rescale_betas_zero_snr": True}}}), encoding="utf-8")


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def append_line(path: Path, step: int) -> None:
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"step": step, "loss": 0.1, "lr": 1e-4, "grad_norm": 1.0, "seconds": 0.4}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=1000, help="steps between validations")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256, help="validation images' side in px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()

    from expertune.ui.server import make_server

    figures: dict[str, object] = {"steps": args.steps, "images": args.images, "image_px": args.size}
    with tempfile.TemporaryDirectory() as scratch:
        ws = Path(scratch)
        started = time.perf_counter()
        write_run(ws / "big", args.steps, args.every, args.images, args.size)
        metrics = ws / "big" / "metrics.jsonl"
        figures["metrics_mib"] = round(metrics.stat().st_size / 2**20, 1)
        print(f"wrote the run in {time.perf_counter() - started:.1f} s ({figures['metrics_mib']} MiB of metrics)")

        if not args.no_browser:  # first: a fresh server, the page opened straight away (nothing read yet)
            server, app = make_server(ws, "127.0.0.1", 0)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            try:
                figures.update(browser(f"http://127.0.0.1:{server.server_address[1]}", metrics, args.steps + 1000,
                                       args.repeats))
            finally:
                server.shutdown()
                app.jobs.close()
                server.server_close()
        server, app = make_server(ws, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        get(url + "/api/session")
        try:
            started = time.perf_counter()
            page = get(url + "/api/run?path=big")
            opened_run = time.perf_counter() - started
            data = get(url + "/api/metrics?path=big&points=600")
            cold = time.perf_counter() - started
            started = time.perf_counter()
            get(url + "/api/run?path=big")
            data = get(url + "/api/metrics?path=big&points=600")
            warm = time.perf_counter() - started
            cells = sum(len(r["cells"]) for g in page["gallery"]["groups"] for r in g["rows"])  # type: ignore[index]
            figures.update(api_open_cold_s=round(cold, 3), api_run_page_s=round(opened_run, 3),
                           api_open_warm_s=round(warm, 3), gallery_cells=cells,
                           points_sent=len(data["training"]["0"]["loss"]["step"]))  # type: ignore[index]
            latencies = []
            step = args.steps + 2000
            for _ in range(args.repeats):
                version = get(url + "/api/metrics?path=big")["version"]
                step += 1
                append_line(metrics, step)
                written = time.perf_counter()
                while True:
                    answer = get(f"{url}/api/metrics?path=big&version={version}")
                    if not answer.get("unchanged") and answer["last_step"] == step:
                        break
                    time.sleep(0.05)
                latencies.append(time.perf_counter() - written)
            figures["api_update_s_median"] = round(statistics.median(latencies), 3)
        finally:
            server.shutdown()
            app.jobs.close()
    print(json.dumps(figures, indent=2))


def browser(url: str, metrics: Path, step: int, repeats: int) -> dict[str, object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,900"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        drawn = ("const i = document.querySelector('.gallery img'); return document.getElementById('metrics-step') "
                 "&& document.querySelector('svg.chart') && i && i.complete && i.naturalWidth > 0")
        driver.get("about:blank")
        started = time.perf_counter()
        driver.get(url + "/#/run/big")  # the server has read nothing of the run yet
        WebDriverWait(driver, 30, poll_frequency=0.01).until(lambda d: d.execute_script(drawn))
        first = time.perf_counter() - started
        opens = []
        for _ in range(repeats):
            driver.get("about:blank")
            started = time.perf_counter()
            driver.get(url + "/#/run/big")
            WebDriverWait(driver, 30, poll_frequency=0.01).until(lambda d: d.execute_script(drawn))
            opens.append(time.perf_counter() - started)
        updates = []
        for _ in range(repeats):
            step += 1
            append_line(metrics, step)
            written = time.perf_counter()
            WebDriverWait(driver, 10, poll_frequency=0.01).until(
                lambda d: d.execute_script("const e = document.getElementById('metrics-step'); return e && e.textContent")
                == f"metrics up to step {step}")
            updates.append(time.perf_counter() - written)
        return {"browser_first_open_s": round(first, 3), "browser_open_s_median": round(statistics.median(opens), 3), "browser_open_s_max": round(max(opens), 3),
                "browser_update_s_median": round(statistics.median(updates), 3),
                "browser_update_s_max": round(max(updates), 3)}
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
