"""`expertune report`: the run page as one file that requests nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ui_helpers import write_run

from expertune.cli import main
from expertune.errors import ConfigError
from expertune.ui.report import write_report


def test_report_is_self_contained_with_the_images_inlined(tmp_path: Path) -> None:
    run = write_run(tmp_path / "stage1", 6, finished=True, images=3)
    out = tmp_path / "share" / "report.html"
    assert main(["report", str(run), "-o", str(out), "--image_width", "32"]) == 0
    html = out.read_text(encoding="utf-8")
    assert html.count("data:image/jpeg;base64,") == 3 * 4  # 3 prompts x 4 validation steps
    markup = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    assert not re.search(r'(src|href)="(?!data:|#)', markup)  # no file, server or network reference
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)
    assert "<script src" not in html and "/static/" not in html and "</script>" in html
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', html, re.S)
                      .group(1).replace("<\\/", "</"))
    assert data["summary"]["state"] == "finished" and data["metrics"]["last_step"] == 6
    assert data["schedule"]["bands"][0]["lo"] == 350


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metrics.jsonl or run.json"):
        write_report(tmp_path / "empty", tmp_path / "r.html")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{", encoding="utf-8")
    assert main(["report", str(tmp_path / "bad"), "-o", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()
