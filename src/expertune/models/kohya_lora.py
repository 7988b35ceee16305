"""LoRA experts in the kohya / ComfyUI layout: `lora_unet_<original module path>.lora_down.weight`, `.lora_up.weight`
and `.alpha`, the module path in the original SDXL names (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) with
dots as underscores. ComfyUI, A1111 and diffusers' `load_lora_weights` read it.

Written from the diffusers LoRA file an expert saves (`pytorch_lora_weights.safetensors`, keys
`unet.<module>.lora.down.weight` / `.lora.up.weight`); alpha comes from the adapter metadata diffusers stores beside
the weights, or equals the rank (what diffusers applies to a file without it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from expertune.errors import ModelError
from expertune.models.single_file import PRECISIONS, unet_to_original

KOHYA_PREFIX = "lora_unet_"
_PAIRS = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"))  # diffusers' and peft's


def adapter_alpha(metadata: dict[str, str] | None, rank: int) -> float:
    """lora_alpha from diffusers' `lora_adapter_metadata` (safetensors metadata), else the rank."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    text = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not text:
        return float(rank)
    document = json.loads(text)
    alpha = document.get("unet.lora_alpha", document.get("lora_alpha")) if isinstance(document, dict) else None
    return float(alpha) if alpha is not None else float(rank)


def diffusers_lora_to_kohya(weights: dict[str, torch.Tensor], layers_per_block: int, alpha: float | None = None,
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A diffusers UNet LoRA state dict (`unet.<module>.lora.down/up.weight`) in kohya names with `.alpha`."""
    pairs = {key[len("unet."):-len(down)]: (down, up) for key in weights for down, up in _PAIRS
             if key.startswith("unet.") and key.endswith(down)}
    modules = sorted(pairs)
    if not modules:
        raise ModelError("the LoRA file holds no UNet adapters (keys unet.<module>.lora.down.weight)")
    others = [k for k in weights if not any(k.endswith(suffix) for pair in _PAIRS for suffix in pair)]
    if others:
        raise ModelError(f"the LoRA file holds weights the kohya layout has no place for (e.g. {others[0]!r}; DoRA "
                         "magnitudes or trained biases): export it in the diffusers format only")
    original = unet_to_original({f"{m}.weight": torch.empty(0) for m in modules}, layers_per_block)
    renamed = dict(zip(original, modules))  # one original name per module, in the modules' order
    out: dict[str, torch.Tensor] = {}
    for original_key, module in renamed.items():
        name = KOHYA_PREFIX + original_key.removesuffix(".weight").replace(".", "_")
        down_suffix, up_suffix = pairs[module]
        down, up = weights[f"unet.{module}{down_suffix}"], weights.get(f"unet.{module}{up_suffix}")
        if up is None:
            raise ModelError(f"LoRA module {module!r} has lora.down but no lora.up weight")
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        out[f"{name}.lora_down.weight"] = cast(down).contiguous()
        out[f"{name}.lora_up.weight"] = cast(up).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    return out


def save_kohya_lora(lora_file: str | os.PathLike, destination: str | os.PathLike, layers_per_block: int, *,
                    precision: str = "fp32", metadata: dict[str, str] | None = None) -> Path:
    """Convert an expert's diffusers LoRA file to one kohya-layout `.safetensors`, written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not Path(lora_file).is_file() and (Path(lora_file).parent / "adapter_config.json").is_file():
        raise ModelError(f"{Path(lora_file).parent} holds LoHa / LoKr adapters (peft's layout), which expertune does "
                         "not convert to the kohya layout: export it in the diffusers format only (issue 23)")
    with safe_open(str(lora_file), "pt") as handle:
        weights = {key: handle.get_tensor(key) for key in handle.keys()}
        stored = handle.metadata()
    ranks = {t.shape[0] for k, t in weights.items() if k.endswith((_PAIRS[0][0], _PAIRS[1][0]))}
    alpha = adapter_alpha(stored, max(ranks) if ranks else 1) if len(ranks) == 1 else None
    state = diffusers_lora_to_kohya(weights, layers_per_block, alpha, PRECISIONS[precision])
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.partial")
    try:
        save_file(state, str(scratch), metadata={"ss_network_module": "networks.lora", **(metadata or {})})
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return target
