"""--push_to_hub: the model cards and the upload folder, built offline from real runs; an upload that cannot happen
(no token, no network, HF_HUB_OFFLINE) fails with one clear line after the local export, which it never loses."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import FAST_FLAGS
from expertune.cli import main
from expertune.errors import HubUploadError
from expertune.hub import build_upload_folder
from expertune.hub_upload import push_folder
from expertune.train.metrics import read_metrics

SECRET = "hf_expertuneTestTokenNeverToBeShown"
HOLDOUT = ["--eval_holdout_fraction=0.17", "--eval_timesteps_per_subband=2", "--eval_subbands=2"]


@pytest.fixture()
def no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


class _FakeHub(BaseHTTPRequestHandler):
    """The three requests of an upload of small files, answered as the hub answers them: create the repository,
    tell each file's upload mode ("regular": its bytes inline in the commit), take the commit."""

    received: dict[str, bytes] = {}
    requests: list[tuple[str, str, dict]] = []

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        root = f"http://127.0.0.1:{self.server.server_port}"  # type: ignore[attr-defined]
        self.requests.append((self.path, self.headers.get("Authorization", ""),
                              json.loads(body) if self.path == "/api/repos/create" else {}))
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self._answer(200, {"url": f"{root}/{request.get('organization') or 'me'}/{request['name']}"})
        elif self.path == "/api/validate-yaml":  # the hub checks a README's front matter before the commit
            import yaml

            front = json.loads(body)["content"].split("---\n")[1]
            valid = isinstance(yaml.safe_load(front), dict)
            self._answer(200 if valid else 400, {"errors": [] if valid else [{"message": "bad YAML"}], "warnings": []})
        elif "/preupload/" in self.path:
            self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        elif "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            self._answer(200, {"commitUrl": f"{root}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        else:
            self._answer(404, {})

    def do_GET(self) -> None:  # noqa: N802
        self._answer(404, {})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch, no_token) -> Iterator[type[_FakeHub]]:
    from huggingface_hub import constants

    _FakeHub.received, _FakeHub.requests = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    try:
        yield _FakeHub
    finally:
        server.shutdown()
        server.server_close()


def _code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_without_a_token_the_upload_says_how_to_log_in(tmp_path: Path, no_token) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(HubUploadError, match=r"no Hugging Face token .* `hf auth login` or set HF_TOKEN"):
        push_folder(tmp_path / "folder", "me/x", message="test")


def test_an_unreachable_hub_is_named_and_the_token_never_shown(tmp_path: Path, monkeypatch, no_token) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    (tmp_path / "folder").mkdir()
    with pytest.raises(HubUploadError) as raised:
        push_folder(tmp_path / "folder", "me/x", message="test")
    assert "cannot reach the hub at http://127.0.0.1:9" in str(raised.value) and SECRET not in str(raised.value)


@pytest.mark.integration
def test_a_run_exports_then_fails_the_offline_upload_and_keeps_everything(
        tiny_model_dir: Path, small_dataset: Path, tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["train", *FAST_FLAGS, *HOLDOUT, f"--pretrained_model_name_or_path={tiny_model_dir}",
                     f"--data_backend_config={small_dataset}", f"--output_dir={output}", "--report_to=none",
                     "--timestep_range=350,999", "--max_train_steps=2", "--checkpoint_step_interval=1",
                     "--push_to_hub", "--hub_model_id=me/tiny-expert", "--push_checkpoints_to_hub"])
    out, err = capsys.readouterr()
    assert code == 5
    (line,) = [line for line in err.splitlines() if line.startswith("expertune: error:")]
    assert "HF_HUB_OFFLINE=1 forbids uploading" in line and f"The experts are saved in {output}" in line
    assert f"hf upload me/tiny-expert {output / 'hub_upload'} ." in line
    assert "saved to" in out  # the expert was exported before the upload was tried
    warnings = [r.getMessage() for r in caplog.records if "--push_checkpoints_to_hub" in r.getMessage()]
    assert len(warnings) == 2 and all("training goes on" in w for w in warnings)  # one per checkpoint
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    pipeline, folder = output / "pipeline", output / "hub_upload"
    assert json.loads((pipeline / "expert.json").read_text())["timestep_range"] == [350, 999]
    # The folder is the pipeline at the top (hard links), the card and the last validation's images.
    for name in ("model_index.json", "expert.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        assert (folder / name).samefile(pipeline / name) or (folder / name).read_bytes() == (pipeline / name).read_bytes()
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["text_to_image_prompt.png"]
    assert not any((folder / name).exists() for name in ("checkpoints", "run.json", "metrics.jsonl", "validation"))
    card = _card(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"expertune", "stable-diffusion-xl"} <= set(card.data.tags) and card.data.base_model is None  # a local base
    text = card.text
    assert "timesteps [350, 999] of 1000" in text and "prediction_type=epsilon" in text
    assert f"| base model | a local model ({tiny_model_dir.name}) |" in text and str(tiny_model_dir) not in text
    assert "denoising_end=0.65" in text and "![text_to_image_prompt](images/text_to_image_prompt.png)" in text
    (last,) = read_metrics(output / "metrics.jsonl", kind="validation")[-1:]
    for key, value in last.items():
        if match := re.fullmatch(r"eval/loss_(\d+)_(\d+)", key):
            assert f"| {match[1]}–{match[2]} | {value:.5f} |" in text
    assert f"| mean over the band | {last['eval/loss']:.5f} |" in text
    (code_block,) = _code_blocks(text)
    compile(code_block, "card", "exec")
    assert 'StableDiffusionXLPipeline.from_pretrained("me/tiny-expert"' in code_block
    everything = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in everything
    assert not any(SECRET.encode() in p.read_bytes() for p in output.rglob("*") if p.is_file())


@pytest.mark.integration
def test_a_mixture_folder_has_a_card_per_expert_and_one_for_the_chain(tiny_model_dir: Path, small_dataset: Path,
                                                                      tmp_path: Path, fake_hub) -> None:
    from expertune.config import load_config
    from expertune.train.loop import train

    output = tmp_path / "mix"
    config, _ = load_config([*FAST_FLAGS, *HOLDOUT, f"--pretrained_model_name_or_path={tiny_model_dir}",
                             f"--data_backend_config={small_dataset}", f"--output_dir={output}", "--report_to=none",
                             "--mixture_boundaries=350", "--max_train_steps=2", "--validation_using_datasets",
                             "--train_batch_size=2"])
    train(config)
    (output / "expert-0" / "extra.safetensors").write_bytes(b"an export the export verb might add")
    (output / "workflow.json").write_text("{}")
    folder = build_upload_folder(output, "me/mixture")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"README.md", "mixture.json", "expert-0/README.md", "expert-1/README.md", "expert-0/extra.safetensors",
            "workflow.json", "expert-0/pipeline/expert.json", "expert-1/pipeline/unet/diffusion_pytorch_model.safetensors",
            "expert-0/images/text_to_image_prompt.png", "expert-1/images/partial_denoise_00.png",
            "images/chain_prompt.png"} <= files
    assert not any(f.split("/")[0] in ("checkpoints", "validation", "logs", "run.json", "metrics.jsonl") for f in files)
    mixture = _card(folder / "README.md")
    assert mixture.data.pipeline_tag == "text-to-image" and mixture.data.library_name == "diffusers"
    rows = {r["expert"]: r for r in read_metrics(output / "metrics.jsonl", kind="validation") if r["step"] == 2}
    assert f"| [expert-1/pipeline](expert-1/README.md) | [0, 349] | full | {rows[1]['eval/loss']:.5f} |" in mixture.text
    assert f"{rows['mixture']['eval/mixture_loss']:.5f}" in mixture.text
    assert "![chain_prompt](images/chain_prompt.png)" in mixture.text
    (code_block,) = _code_blocks(mixture.text)
    compile(code_block, "card", "exec")
    assert "denoising_end=0.65" in code_block and "denoising_start=0.65" in code_block
    low = _card(folder / "expert-1" / "README.md")
    assert low.data.pipeline_tag == "image-to-image"
    assert "continues the previous expert's latents from denoising_start=0.65" in low.text
    assert "![partial_denoise_00](images/partial_denoise_00.png)" in low.text
    assert f"| mean over the band | {rows[1]['eval/loss']:.5f} |" in low.text
    # The upload sends exactly the folder, to a private repository, with the token only in its header.
    from dataclasses import replace

    from expertune.hub import publish_run

    hub = replace(config.hub, push_to_hub=True, hub_model_id="me/mixture")
    url = publish_run(replace(config, hub=hub))
    assert url.endswith("/me/mixture/commit/" + "a" * 40)
    assert fake_hub.received == {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                                 if p.is_file()}
    create = next(body for path, _, body in fake_hub.requests if path == "/api/repos/create")
    assert create.get("visibility", create.get("private")) in ("private", True) and create["name"] == "mixture"
    assert all(auth == f"Bearer {SECRET}" for _, auth, _ in fake_hub.requests)



def test_push_to_hub_needs_a_repository_name() -> None:
    from expertune.config import load_config
    from expertune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"push_to_hub \(from .*\) needs hub_model_id: add --hub_model_id=NAME"):
        load_config(["--push_to_hub"])
    config, _ = load_config(["--push_to_hub", "--hub_model_id=me/x", "--push_checkpoints_to_hub"])
    assert (config.hub.push_to_hub, config.hub.hub_model_id, config.hub.push_checkpoints_to_hub) == (True, "me/x", True)


def test_a_lora_expert_of_a_hub_base_chains_its_adapters_onto_the_base() -> None:
    from expertune.experts import ExpertBand
    from expertune.expert_format import ExpertDescription
    from expertune.hub import PublishedExpert, expert_card

    schedule = {"num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    lora = ExpertDescription(ExpertBand(0, 349), schedule, model_type="lora", base_model="some-org/some-base")
    card = expert_card(PublishedExpert("", lora, (), {}), "me/low-noise")
    assert "base_model: some-org/some-base" in card and "- lora" in card and "pipeline_tag: image-to-image" in card
    (code,) = _code_blocks(card)
    compile(code, "card", "exec")
    assert 'expert_1 = StableDiffusionXLImg2ImgPipeline.from_pretrained("some-org/some-base"' in code
    assert 'expert_1.load_lora_weights("me/low-noise")' in code
    assert "denoising_start=0.65" in code and "guidance_rescale=0.7" in code
    assert 'expert_0 = StableDiffusionXLPipeline.from_pretrained("OTHER"' in code  # the stage before it
    assert "No held-out images were set aside" in card and "validation was disabled" in card
    local = ExpertDescription(ExpertBand(0, 349), schedule, model_type="lora", base_model="/home/me/sdxl")
    text = expert_card(PublishedExpert("", local, (), {}), "me/low-noise")
    assert "/home/me" not in text and "base_model" not in text.split("---")[1]
