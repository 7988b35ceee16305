"""A start that talks: each part logged as it loads; a model that cannot be had says why and what to do."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from expertune.cli import main
from expertune.errors import ModelError
from expertune.models.source import check_model_source


@pytest.fixture()
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME pointing at an empty folder, as huggingface_hub reads it (its constants are read at import)."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def test_an_uncached_hub_id_offline_names_the_cache_and_the_fix(empty_hub_cache: Path, small_dataset: Path,
                                                                 tmp_path: Path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = main(["train", "--pretrained_model_name_or_path=nobody/not-a-cached-model", f"--output_dir={tmp_path / 'out'}",
                 f"--data_backend_config={small_dataset}", "--max_train_steps=1", "--resolution=64"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("expertune: error:")]
    assert len(lines) == 1, err
    assert "'nobody/not-a-cached-model'" in lines[0] and f"not in the local Hugging Face cache at {empty_hub_cache}" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and "hf download nobody/not-a-cached-model" in lines[0]
    assert "Traceback" not in err and "local_dir_use_symlinks" not in err and "does not exist" not in err


@pytest.mark.parametrize("source", ["./models/nowhere", "/no/such/model/dir", "~/no-such-expertune-model",
                                    "models/sub/dir"])
def test_a_local_path_that_does_not_exist(source: str) -> None:
    with pytest.raises(ModelError, match="does not exist: pass an existing local diffusers SDXL directory"):
        check_model_source(source)


def test_an_invalid_hub_id_is_named() -> None:
    with pytest.raises(ModelError, match="neither an existing local directory nor a valid Hugging Face hub id"):
        check_model_source("not a model!")


class _FakeHub(BaseHTTPRequestHandler):
    """Answers a hub file request as the Hugging Face hub does for each failure: status and X-Error-Code."""

    answers = {"owner/missing": (404, "RepoNotFound"), "owner/gated": (401, "GatedRepo"),
               "owner/nopipe": (404, "EntryNotFound")}

    def do_HEAD(self) -> None:  # noqa: N802
        repo = "/".join(self.path.strip("/").split("/")[:2])
        status, code = self.answers.get(repo, (404, "RepoNotFound"))
        if "/resolve/no-such-branch/" in self.path:
            status, code = 404, "RevisionNotFound"
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_hub(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(empty_hub_cache.parent / "no-token"))
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("source, revision, expected", [
    ("owner/missing", None, "no model 'owner/missing' on the Hugging Face hub (a private one needs a token"),
    ("owner/gated", None, "is gated and no Hugging Face token is set: accept its terms on"),
    ("owner/nopipe", None, "has no model_index.json: it is not a diffusers pipeline"),
    ("owner/gated", "no-such-branch", "has no revision 'no-such-branch'"),
])
def test_hub_failures_say_why_and_the_fix(fake_hub: str, source: str, revision: str | None, expected: str) -> None:
    with pytest.raises(ModelError) as raised:
        check_model_source(source, revision)
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_every_part_is_logged_with_its_size_and_time(tiny_model_dir: Path, caplog) -> None:
    from expertune.models.sdxl import load_components

    with caplog.at_level(logging.INFO, logger="expertune.models"):
        components = load_components(str(tiny_model_dir))
    lines = [r.getMessage() for r in caplog.records]
    assert f"loading model {tiny_model_dir} (local)" in lines
    for part, module in [("unet", components.unet), ("vae", components.vae),
                         ("text_encoder", components.text_encoder_1), ("text_encoder_2", components.text_encoder_2)]:
        count = sum(p.numel() for p in module.parameters())
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        (line,) = [line for line in lines if line.startswith(f"loaded {part} of {tiny_model_dir}:")]
        assert f"{count / 1000:.3g} k parameters" in line or f"{count / 1e6:.3g} M parameters" in line, (line, count)
        assert f"{size / 1e6:.3g} MB (float32) in " in line or f"{size / 1e3:.3g} kB (float32) in " in line, line
        assert line.endswith(" s")
    assert any(line.startswith(f"loaded tokenizer_2 of {tiny_model_dir} in ") for line in lines)


def test_the_hub_download_bars_are_on_and_library_bars_off(monkeypatch) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    import transformers.utils.logging as transformers_logging

    from expertune import cli

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    disable_progress_bars()
    cli._setup_logging(False)
    assert not are_progress_bars_disabled()
    assert not transformers_logging.is_progress_bar_enabled()


def test_the_fake_hub_speaks_the_hub_protocol(fake_hub: str) -> None:
    """The fake answers through huggingface_hub's own error parsing (a guard on the tests above)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    with pytest.raises(GatedRepoError):
        hf_hub_download("owner/gated", "model_index.json")


def test_a_cached_hub_id_loads_offline_with_its_log_and_without_library_noise(
        tiny_model_dir: Path, empty_hub_cache: Path, monkeypatch, caplog, recwarn) -> None:
    """A hub id already in the cache at HF_HOME (the hub cache's own layout) starts offline; the deprecation
    warning diffusers triggers in huggingface_hub on each config fetch is filtered by the CLI."""
    import shutil

    from huggingface_hub import constants

    from expertune import cli
    from expertune.models.sdxl import load_components

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--owner--tiny-sdxl"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cli._quiet_libraries()
    with caplog.at_level(logging.INFO, logger="expertune.models"):
        components = load_components("owner/tiny-sdxl")
    assert components.unet is not None
    lines = [r.getMessage() for r in caplog.records]
    assert f"loading model owner/tiny-sdxl (hub id, revision main; files are fetched into {empty_hub_cache})" in lines
    assert any(line.startswith("loaded unet of owner/tiny-sdxl: ") for line in lines)
    assert not [w for w in recwarn if "local_dir_use_symlinks" in str(w.message)]


def test_no_network_and_not_cached_names_the_endpoint_and_the_cache(empty_hub_cache: Path, monkeypatch) -> None:
    """What hf_hub_download raises when the hub cannot be reached and the file is not cached (constructed here:
    a real connection failure retries for ~20 s), mapped with the cache huggingface_hub would read."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from expertune.models.source import hub_error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    error = hub_error("nobody/not-a-cached-model", None, LocalEntryNotFoundError("connection refused and not in the cache"))
    assert error is not None
    assert str(error).startswith("cannot reach the Hugging Face hub (http://127.0.0.1:9) to fetch model "
                                 f"'nobody/not-a-cached-model', and it is not in the local cache at {empty_hub_cache}")
