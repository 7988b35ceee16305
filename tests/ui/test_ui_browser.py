"""The UI in a real browser (Debian's headless chromium through its chromedriver), on real runs of the tiny model:
the run list, a run started from a config file and its streamed log, a run page that advances live, a gallery
image, sample now, export, compare, and a phone-width page. Any console error fails the test; screenshots go to
outputs/ui-e2e/ (gitignored)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import evaluation_flags, write_stage_env

pytestmark = pytest.mark.integration  # trains and launches processes

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTEFACTS = Path(__file__).resolve().parents[2] / "outputs" / "ui-e2e"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1280,1000"]


@pytest.fixture
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra (make test installs it)")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver packages (make test installs them as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_journeys_in_a_real_browser(browser, trained_experts, tiny_model_dir: Path, tiny_clip_dir: Path,  # type: ignore[no-untyped-def]
                                    small_dataset: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from expertune.ui.server import make_server

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    driver = browser
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    ws = tmp_path / "ws"
    shutil.copytree(trained_experts[0].output_dir, ws / "stage1")  # a finished stage 1 expert
    env = write_stage_env(ws, 2, tiny_model_dir, ws / "stage2", small_dataset)
    extra = ["--max_train_steps=2", "--resolution=64", "--learning_rate=1e-4", "--checkpoint_step_interval=2",
             "--validation_step_interval=1", "--validation_num_inference_steps=4",
             f"--validation_peer_expert={ws / 'stage1'}", *evaluation_flags(tiny_clip_dir)]
    with open(env, "a", encoding="utf-8") as stream:
        stream.write(f'export TRAINER_EXTRA_ARGS="${{TRAINER_EXTRA_ARGS}} {" ".join(extra)}"\n')

    server, app = make_server(ws, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    errors: list[object] = []

    def console_clean(step: str) -> None:
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        errors.extend(severe)
        assert not severe, f"console errors at {step}: {severe}"

    started = time.monotonic()

    def shot(name: str) -> None:
        driver.save_screenshot(str(ARTEFACTS / f"{name}.png"))
        print(f"{time.monotonic() - started:5.1f} s  {name}")

    def jobs_done() -> bool:
        return all(job.state in ("finished", "stopped", "failed") for job in app.jobs.snapshot())

    try:
        # 1. the run list
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#runs a[href='#/run/stage1']"))
        assert "finished" in driver.find_element(By.ID, "runs").text
        shot("01-runs")
        console_clean("run list")

        # 2. start a run from its config.env; its log streams on the job's page
        driver.get(url + "#/jobs")
        box = wait.until(lambda d: d.find_element(By.ID, "config-file"))
        driver.find_element(By.XPATH, "//summary[contains(., 'expertune init')]").click()  # no config yet?
        folder = driver.find_element(By.CSS_SELECTOR, "#init-form input[data-init='folder']")
        folder.clear()
        folder.send_keys("starter")
        driver.find_element(By.XPATH, "//button[text()='Write starter config']").click()
        wait.until(lambda d: d.find_element(By.ID, "config-file").get_attribute("value") == "starter/stage1/config.json")
        assert (ws / "starter" / "stage1" / "config.json").is_file() and (ws / "starter" / "README.md").is_file()
        box.clear()
        box.send_keys("stage2.env")
        driver.find_element(By.XPATH, "//button[text()='Start run']").click()
        wait.until(lambda d: "#/job/" in d.current_url)
        wait.until(lambda d: "$ expertune train --env" in d.find_element(By.ID, "job-log").text)
        wait.until(lambda d: "training" in d.find_element(By.ID, "job-log").text or jobs_done())
        shot("02-job-log")
        console_clean("job page")

        # 3. a run page follows its metrics live: a line appended shows within 2 s
        driver.get(url + "#/run/stage1")
        wait.until(lambda d: d.find_elements(By.ID, "metrics-step"))
        before = driver.find_element(By.ID, "metrics-step").text
        last = [json.loads(line) for line in (ws / "stage1" / "metrics.jsonl").read_text().splitlines()][-1]
        row = {"epoch": 9, "grad_norm": 0.5, "loss": 0.2, "lr": 1e-4, "samples": 5, "seconds": 0.3,
               "step": last["step"] + 1}
        with open(ws / "stage1" / "metrics.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")
        written = time.monotonic()
        WebDriverWait(driver, 2.5, poll_frequency=0.05).until(lambda d: d.execute_script(
            "const e = document.getElementById('metrics-step'); return e && e.textContent")
            == f"metrics up to step {row['step']}")
        assert time.monotonic() - written <= 2.5 and before != f"metrics up to step {row['step']}"
        console_clean("live run page")

        # 4. the started run ends; its page has the schedule, gallery and checkpoints
        WebDriverWait(driver, 120, poll_frequency=0.2).until(lambda d: jobs_done())
        assert [job.state for job in app.jobs.snapshot()] == ["finished"], (ws / ".expertune-ui").glob("jobs/*.log")
        driver.get(url + "#/run/stage2")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#checkpoints button[data-action='sample']"))
        assert "hand-off t=350" in driver.find_element(By.TAG_NAME, "main").text
        shot("03-run-page")

        # 5. a gallery image opens in the viewer (keyboard: Enter opens, Escape closes)
        cell = driver.find_element(By.CSS_SELECTOR, ".gallery button.cell")
        cell.send_keys(Keys.ENTER)
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('viewer-img'); return document.getElementById('viewer').open && "
            "i.complete && i.naturalWidth > 0"))
        shot("04-gallery-image")
        driver.find_element(By.ID, "viewer").send_keys(Keys.ESCAPE)
        wait.until(lambda d: not d.execute_script("return document.getElementById('viewer').open"))
        console_clean("gallery")

        # 6. sample now and export, from the newest checkpoint
        prompt = driver.find_elements(By.CSS_SELECTOR, "#checkpoints input[aria-label^='prompt for']")[-1]
        prompt.clear()
        prompt.send_keys("a red circle on a blue background")
        sample = driver.find_elements(By.CSS_SELECTOR, "#checkpoints button[data-action='sample']")[-1]
        sample.click()
        export = driver.find_elements(By.CSS_SELECTOR, "#checkpoints button[data-action='export']")[-1]
        export.click()
        wait.until(lambda d: len(app.jobs.snapshot()) == 3)
        WebDriverWait(driver, 120, poll_frequency=0.2).until(lambda d: jobs_done())
        states = {job.verb: (job.state, job.rc) for job in app.jobs.snapshot()}
        assert states == {"train": ("finished", 0), "generate": ("finished", 0), "export": ("finished", 0)}, \
            [app.jobs.tail(job) for job in app.jobs.snapshot()]
        exported = ws / "stage2" / "exports" / "checkpoint-2"
        assert (exported / "export.json").is_file() and list((exported / "single_file").glob("*.safetensors"))
        driver.refresh()
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#samples img'); return i && i.complete && i.naturalWidth > 0"))
        assert "“a red circle on a blue background” · seed 0 · guidance 5.0 · 20 steps" in \
            driver.find_element(By.ID, "samples").text  # grouped by its settings, labelled by checkpoint
        shot("05-sample")
        console_clean("sample and export")

        # 7. compare two runs: losses across the schedule and images side by side
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#runs input[type=checkbox]"))
        for box in driver.find_elements(By.CSS_SELECTOR, "#runs input[type=checkbox]"):
            box.click()
        driver.find_element(By.XPATH, "//button[text()='Compare selected']").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#compare-images img"))
        legends = driver.find_element(By.TAG_NAME, "main").text
        assert legends.count("stage1") >= 2 and legends.count("stage2") >= 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) >= 2  # each run across its bands
        shot("06-compare")
        console_clean("compare")

        # 8. a phone: nothing wider than the screen but the scrolling tables
        driver.set_window_size(390, 844)
        driver.get(url + "#/run/stage2")
        wait.until(lambda d: d.find_elements(By.ID, "checkpoints"))
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        shot("07-phone")
        console_clean("phone")
    finally:
        server.shutdown()
        app.jobs.close()
        server.server_close()
    assert not errors
