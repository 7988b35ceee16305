"""LoRA experts: peft adapters on the UNet, saved in the form diffusers' `load_lora_weights` reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from expertune.errors import ConfigError
from expertune.expert_format import ExpertDescription
from expertune.io_utils import staged_directory

log = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def target_modules(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_lora_adapters(unet: Any, rank: int, alpha: float | None, dropout: float, modules: str) -> int:
    """Freeze the UNet and add trainable LoRA adapters; returns the number of trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    refusal = (f"lora_target_modules={modules!r} matched no UNet module; name attention projections such as "
               "'to_k,to_q,to_v,to_out.0'")
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout,
                                    target_modules=target_modules(modules), init_lora_weights=True))
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
