"""LoRA experts: peft adapters on the UNet, saved in the form diffusers' `load_lora_weights` reads (LoRA, DoRA), or in
peft's own layout (LoHa, LoKr; models/adapters.py)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertune.errors import ConfigError, ModelError
from expertune.expert_format import ExpertDescription
from expertune.io_utils import staged_directory
from expertune.models.adapters import AdapterSpec

if TYPE_CHECKING:
    from peft import PeftConfig

log = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # LoHa / LoKr experts: peft's layout
PEFT_CONFIG = "adapter_config.json"


def target_modules(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_lora_adapters(unet: Any, rank: int, alpha: float | None, dropout: float, modules: str) -> int:
    """Freeze the UNet and add trainable LoRA adapters; returns the number of trainable parameters."""
    return add_adapters(unet, AdapterSpec("lora", rank, alpha, tuple(target_modules(modules)), dropout=dropout))


def add_adapters(unet: Any, spec: AdapterSpec) -> int:
    """Freeze the UNet and add the trainable adapters `spec` describes (LoRA, DoRA, LoHa, LoKr); returns the
    number of trainable parameters."""
    unet.requires_grad_(False)
    modules = ",".join(spec.target_modules)
    refusal = (f"lora_target_modules={modules!r} matched no UNet module; name attention projections such as "
               "'to_k,to_q,to_v,to_out.0'")
    try:
        with warnings.catch_warnings():  # an int8 base (models/quantize.py): training needs no merge
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
            unet.add_adapter(spec.peft_config())
    except ValueError as error:
        raise ConfigError(f"{refusal} ({error})") from None
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError(refusal)
    return trainable


def save_lora_expert(unet: Any, scheduler: Any, expert: ExpertDescription, destination: str | os.PathLike) -> Path:
    """Write the adapters (diffusers LoRA format), the trained scheduler config and expert.json, atomically."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    config = getattr(unet, "peft_config", {}).get("default")
    if config is not None and type(config).__name__ != "LoraConfig":
        return _save_peft_expert(unet, config, scheduler, expert, destination)
    with staged_directory(destination) as staged:
        # peft's own names (lora_A / lora_B), which diffusers loads for every layer kind; converting them to the
        # older lora.down / lora.up names renames linear layers only, and a file mixing both loads wrong
        layers = get_peft_model_state_dict(unet)
        config = getattr(unet, "peft_config", {}).get("default")  # its lora_alpha: a file without it loads at alpha = rank
        metadata = None if config is None else config.to_dict()
        StableDiffusionXLPipeline.save_lora_weights(str(staged), unet_lora_layers=layers, safe_serialization=True,
                                                    unet_lora_adapter_metadata=metadata)
        scheduler.save_pretrained(str(staged / "scheduler"))
        expert.write(staged)
    log.info("saved LoRA expert to %s", destination)
    return Path(destination)


def _save_peft_expert(unet: Any, adapter_config: "PeftConfig", scheduler: Any, expert: ExpertDescription,
                      destination: str | os.PathLike) -> Path:
    """LoHa / LoKr adapters, which diffusers' LoRA loader does not read, in peft's own layout:
    `adapter_config.json` + `adapter_model.safetensors` (peft `PeftModel.from_pretrained` reads it; so does
    `load_adapter_expert`)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    with staged_directory(destination) as staged:
        adapter_config.save_pretrained(str(staged))
        layers = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        save_file(layers, str(staged / ADAPTER_WEIGHTS))
        scheduler.save_pretrained(str(staged / "scheduler"))
        expert.write(staged)
    log.info("saved %s adapter expert to %s (peft layout)", adapter_config.peft_type, destination)
    return Path(destination)


def load_adapter_expert(pipe: Any, directory: str | os.PathLike, name: str) -> None:
    """Load an adapter expert onto `pipe`'s UNet as adapter `name`: diffusers' `load_lora_weights` for LoRA and
    DoRA, peft for the LoHa / LoKr layout (`adapter_config.json`)."""
    path = Path(directory)
    if not (path / PEFT_CONFIG).is_file():
        pipe.load_lora_weights(str(path), adapter_name=name)
        return
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(path))
    pipe.unet.add_adapter(config, adapter_name=name)
    result = set_peft_model_state_dict(pipe.unet, load_file(str(path / ADAPTER_WEIGHTS)), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(f"{path / ADAPTER_WEIGHTS} holds weights the UNet has no place for (e.g. {unexpected[0]})")
