"""DoRA, LoHa and LoKr adapters (models/adapters.py): built through peft, saved, loaded back with the same outputs;
bad LyCORIS files and bad combinations refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertune.config import load_config
from expertune.errors import ConfigError, ModelError
from expertune.expert_format import ExpertDescription
from expertune.experts import ExpertBand
from expertune.models.adapters import AdapterSpec, read_lycoris_config
from expertune.models.kohya_lora import save_kohya_lora
from expertune.models.lora import ADAPTER_WEIGHTS, LORA_WEIGHTS, PEFT_CONFIG, add_adapters, load_adapter_expert, \
    save_lora_expert

TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 48, generator=g), torch.randn(1, 32, generator=g),
            torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32))


def _predict(unet, inputs) -> torch.Tensor:  # noqa: ANN001
    x, embeds, pooled, ids = inputs
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@pytest.mark.parametrize("spec, layout", [
    (AdapterSpec("lora", 4, 8.0, TARGETS, use_dora=True), LORA_WEIGHTS),
    (AdapterSpec("loha", 4, 4.0, TARGETS), ADAPTER_WEIGHTS),
    (AdapterSpec("lokr", 4, 4.0, TARGETS, factor=4), ADAPTER_WEIGHTS),
])
def test_adapters_save_and_load_back_with_the_same_outputs(spec: AdapterSpec, layout: str, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    inputs = _inputs()
    base = _predict(unet, inputs)
    assert add_adapters(unet, spec) > 0
    kinds = {type(module).__module__.split(".")[-2] for module in unet.modules() if "peft.tuners" in type(module).__module__}
    assert kinds & {"lora", "loha", "lokr"} == {spec.algo}
    with torch.no_grad():  # trained adapters: move every adapter weight off its initial value
        for parameter in (p for p in unet.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn_like(parameter))
    trained = _predict(unet, inputs)
    assert not torch.allclose(trained, base)
    description = ExpertDescription(ExpertBand(0, 349), {}, model_type="lora", base_model=str(tiny_model_dir))
    scheduler = EulerDiscreteScheduler.from_pretrained(str(tiny_model_dir), subfolder="scheduler")
    saved = save_lora_expert(unet, scheduler, description, tmp_path / "expert")
    assert (saved / layout).is_file() and (saved / "expert.json").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    load_adapter_expert(pipe, saved, "expert_0")  # diffusers' load_lora_weights for DoRA, peft for LoHa / LoKr
    assert torch.allclose(_predict(pipe.unet, inputs), trained, atol=1e-5)
    if spec.use_dora:
        assert pipe.unet.peft_config["expert_0"].use_dora and pipe.unet.peft_config["expert_0"].lora_alpha == 8
        with pytest.raises(ModelError, match="DoRA"):  # the kohya layout has no place for the magnitudes
            save_kohya_lora(saved / LORA_WEIGHTS, tmp_path / "kohya.safetensors", layers_per_block=2)
    else:
        assert json.loads((saved / PEFT_CONFIG).read_text())["peft_type"] == spec.algo.upper()
        with pytest.raises(ModelError, match="diffusers format only"):
            save_kohya_lora(saved / LORA_WEIGHTS, tmp_path / "kohya.safetensors", layers_per_block=2)


def _lycoris(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_lycoris_config_fields(tmp_path: Path) -> None:
    path = _lycoris(tmp_path, {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1,
                               "factor": 16, "apply_preset": {"target_module": ["Attention"]}})
    spec = read_lycoris_config(path, 16, None, 0.0, TARGETS)
    assert (spec.algo, spec.rank, spec.alpha, spec.factor) == ("lokr", 10000, 1.0, 16)
    config = spec.peft_config()
    assert (type(config).__name__, config.r, config.alpha, config.decompose_factor) == ("LoKrConfig", 10000, 1.0, 16)
    dora = read_lycoris_config(_lycoris(tmp_path, {"algo": "lora", "dora_wd": True}), 8, None, 0.1, TARGETS)
    assert dora.use_dora and dora.rank == 8 and dora.alpha == 8 and dora.peft_config().lora_dropout == 0.1
    assert read_lycoris_config(_lycoris(tmp_path, {"algo": "loha", "linear_dim": 4}), 8, None, 0.0,
                               TARGETS).peft_config().r == 4


@pytest.mark.parametrize("document, words", [
    ({"algo": "locon"}, "supported; expertune trains the LyCORIS algorithms peft provides: lora, loha, lokr"),
    ({"algo": "ia3"}, "lora, loha, lokr"),
    ({"algo": "loha", "factor": 4}, "factor are not supported with algo=loha"),
    ({"algo": "lokr", "weight_decompose": True}, "weight_decompose"),
    ({"algo": "lokr", "multiplier": 0.5}, "multiplier"),
    ({"algo": "lokr", "linear_dim": "big"}, "linear_dim='big'"),
    (["lokr"], "JSON object"),
])
def test_bad_lycoris_configs_are_refused_naming_the_file(tmp_path: Path, document: object, words: str) -> None:
    path = _lycoris(tmp_path, document)
    with pytest.raises(ConfigError) as info:
        load_config(["--model_type=lora", "--lora_type=lycoris", f"--lycoris_config={path}"], find_config=False)
    assert words in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("flags, words", [
    (["--use_dora"], "use_dora (from command line) trains DoRA adapters, but model_type=full"),
    (["--lora_type=lycoris", "--lycoris_config=x.json"], "lora_type=lycoris (from command line) trains adapters"),
    (["--model_type=lora", "--lora_type=lycoris"], "needs lycoris_config"),
    (["--model_type=lora", "--lora_type=lycoris", "--lycoris_config=/nonexistent.json"], "cannot read it"),
    (["--model_type=lora", "--lora_type=lycoris", "--lycoris_config=x.json", "--use_dora"], "dora_wd"),
])
def test_bad_adapter_combinations_are_refused_before_any_model_loads(flags: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match="") as info:
        load_config(flags, find_config=False)
    assert words in str(info.value)


def test_dora_and_lycoris_are_options() -> None:
    config, _ = load_config(["--model_type=lora", "--use_dora"], find_config=False)
    assert config.model.use_dora and config.to_dict()["model"]["use_dora"] is True


def test_use_dora_from_simpletuners_config_env(tmp_path: Path) -> None:
    env = tmp_path / "config.env"
    env.write_text("export MODEL_TYPE=lora\nexport USE_DORA=true\nexport LORA_TYPE=standard\n", encoding="utf-8")
    config, _ = load_config(["--env", str(env)], find_config=False)
    assert config.model.use_dora and config.model.model_type == "lora"
