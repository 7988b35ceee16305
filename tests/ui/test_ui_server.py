"""The UI's HTTP API on a real server (loopback, a free port): reads, live versions, and every safety rule."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from ui_helpers import Served, serve, write_run

from expertune.ui.safety import Guard, Refused, inside


def test_run_list_shows_every_folder_and_damage_never_stops_the_server(served: Served) -> None:
    status, data = served.get("/api/runs")
    assert status == 200
    states = {run["path"]: run["state"] for run in data["runs"]}  # type: ignore[index, union-attr]
    assert states == {"damaged": "damaged", "foreign": "damaged", "stage1": "finished", "stage2": "finished",
                      "sweep/going": "running"}
    status, page = served.get("/api/run?path=damaged")
    assert status == 200 and page["summary"]["state"] == "damaged"  # type: ignore[index]
    (served.workspace / "stage1" / "metrics.jsonl").write_bytes(b"\xff\xfe garbage \x00\n")  # damaged later
    assert served.get("/api/run?path=stage1")[0] == 200
    assert served.get("/api/runs")[0] == 200


def test_run_page_has_schedule_gallery_config_and_checkpoints(served: Served) -> None:
    status, page = served.get("/api/run?path=stage1")
    assert status == 200
    assert page["schedule"]["bands"] == [{"expert": 0, "lo": 350, "hi": 999, "role": "trained"}]  # type: ignore[index]
    assert page["gallery"]["steps"] == [0, 2, 4, 6]  # type: ignore[index]
    assert page["config"]["train"]["max_train_steps"] == 6  # type: ignore[index]
    assert page["checkpoints"] == [] and page["run_json"]["steps"] == 6  # type: ignore[index]


def test_metrics_poll_answers_unchanged_until_a_line_is_appended(served: Served) -> None:
    status, first = served.get("/api/metrics?path=sweep/going&points=50")
    assert status == 200 and first["last_step"] == 3
    again = served.get(f"/api/metrics?path=sweep/going&version={first['version']}")[1]
    assert again == {"unchanged": True, "version": first["version"]}
    with open(served.workspace / "sweep" / "going" / "metrics.jsonl", "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"step": 4, "loss": 0.1, "lr": 1e-4, "grad_norm": 0.3, "seconds": 0.2}) + "\n")
    after = served.get(f"/api/metrics?path=sweep/going&version={first['version']}")[1]
    assert after["last_step"] == 4 and after["training"]["0"]["loss"]["step"][-1] == 4  # type: ignore[index]


def test_images_and_thumbnails_are_served_from_inside_the_workspace_only(served: Served, tmp_path: Path) -> None:
    image = "stage1/validation/step_000006/text_to_image_p0.png"
    with urllib.request.urlopen(f"{served.url}/api/image?path={image}&w=16") as response:
        assert response.headers["Content-Type"] == "image/png" and response.read()[:4] == b"\x89PNG"
    (tmp_path / "secret.png").write_bytes(b"not for you")
    os.symlink(tmp_path / "secret.png", served.workspace / "stage1" / "link.png")
    for path in ("../secret.png", "stage1/../../secret.png", "/etc/passwd", "stage1/link.png", "%2e%2e/secret.png"):
        status, data = served.get(f"/api/image?path={path}")
        assert status in (403, 404), path
        assert "outside" in str(data["error"]) or "absolute" in str(data["error"]) or "not an image" in str(data["error"])
    assert served.get("/api/run?path=../")[0] == 403
    assert served.get("/api/image?path=stage1/run.json")[0] == 404  # inside, but not an image


def test_actions_need_the_csrf_token_and_act_inside_the_workspace(served: Served) -> None:
    assert served.post("/api/stop", {"run": "sweep/going"}, csrf=None)[0] == 403
    assert served.post("/api/stop", {"run": "sweep/going"}, csrf="guessed")[0] == 403
    assert not (served.workspace / "sweep" / "going" / "stop_requested").exists()
    status, data = served.post("/api/stop", {"run": "sweep/going"})
    assert status == 200 and (served.workspace / "sweep" / "going" / "stop_requested").exists()
    assert served.post("/api/stop", {"run": "../.."})[0] == 403
    status, data = served.post("/api/export", {"run": "stage1", "checkpoint": "../../x"})
    assert status == 400 and "checkpoint" in str(data["error"])
    assert served.post("/api/export", {"run": "stage1", "checkpoint": "checkpoint-9"})[0] == 404
    status, data = served.post("/api/train", {"config": "../outside.toml"})
    assert status == 403
    (served.workspace / "bad.toml").write_text("[train]\nlearning_rate = 'fast'\n", encoding="utf-8")
    status, data = served.post("/api/train", {"config": "bad.toml"})
    assert status == 400 and "bad.toml" in str(data["error"])
    assert served.app.jobs.snapshot() == []  # type: ignore[attr-defined]


def test_a_foreign_host_name_is_refused_on_loopback(served: Served) -> None:
    status, data = served.get("/api/runs", headers={"Host": "attacker.example:80"})
    assert status == 403 and "loopback" in str(data["error"])
    assert served.get("/api/runs", headers={"Host": "localhost"})[0] == 200


def test_another_address_needs_the_token(workspace: Path) -> None:
    guard = Guard.for_address("0.0.0.0", 1)
    assert guard.token and len(guard.token) >= 24 and Guard.for_address("127.0.0.1", 1).token is None
    for served in serve(workspace):
        served.app.guard = Guard("0.0.0.0", 1, token="sesame")  # type: ignore[attr-defined]
        request = urllib.request.Request(served.url + "/api/runs")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(served.url + "/?token=sesame") as response:  # the printed link sets the cookie
            assert response.status == 200 and b"expertune" in response.read()
        with opener.open(served.url + "/api/runs") as response:
            assert json.loads(response.read())["runs"]


def test_inside_refuses_absolute_and_escaping_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert inside(tmp_path, "a") == (tmp_path / "a").resolve()
    for bad in ("", "/etc", "a/../../x", "..", "C:\\x"):
        with pytest.raises(Refused):
            inside(tmp_path, bad)


def test_static_page_and_its_assets_are_packaged(served: Served) -> None:
    with urllib.request.urlopen(served.url + "/") as response:
        html = response.read().decode()
        assert "/static/app.js" in html and "Content-Security-Policy" in response.headers
    for name in ("app.js", "app.css"):
        with urllib.request.urlopen(f"{served.url}/static/{name}") as response:
            assert len(response.read()) > 1000
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html


def test_a_new_run_appears_while_serving(served: Served) -> None:
    served.get("/api/runs")
    write_run(served.workspace / "later", 2, finished=True)
    served.app._runs_at = -10.0  # type: ignore[attr-defined]  # as if RUNS_TTL had passed
    paths = [run["path"] for run in served.get("/api/runs")[1]["runs"]]  # type: ignore[index, union-attr]
    assert "later" in paths


def test_ui_verb_refuses_a_missing_workspace_and_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from expertune.cli import main

    assert main(["ui", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["ui", str(tmp_path), "--port", str(busy.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err


def test_a_second_ui_on_the_same_workspace_is_refused(served: Served) -> None:
    from expertune.errors import ConfigError
    from expertune.ui.server import make_server

    with pytest.raises(ConfigError, match="another expertune ui"):
        make_server(served.workspace, "127.0.0.1", 0)


def test_init_writes_a_starter_config_inside_the_workspace_and_never_overwrites(served: Served) -> None:
    body = {"folder": "starter", "model": "ssd-1b", "layout": "two-stage", "gpu_memory": 24, "format": "json",
            "data": "datasets/images", "output": "output"}
    status, data = served.post("/api/init", body)
    assert status == 200 and "starter/stage1/config.json" in data["written"]  # type: ignore[operator]
    stage1 = json.loads((served.workspace / "starter" / "stage1" / "config.json").read_text())
    assert any("output" in str(v) for v in stage1.values())
    assert "starter/stage1/config.json" in served.get("/api/configs")[1]["configs"]  # type: ignore[operator]
    status, data = served.post("/api/init", body)  # again: it would overwrite
    assert status == 400 and "starter" in str(data["error"])
    assert served.post("/api/init", body | {"folder": "../escape"})[0] == 403
    assert served.post("/api/init", body | {"folder": "other", "output": "/tmp/out"})[0] == 403
    assert served.post("/api/init", body | {"folder": "other", "gpu_memory": "lots"})[0] == 400
    assert not (served.workspace.parent / "escape").exists() and not (served.workspace / "other").exists()
