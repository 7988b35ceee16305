"""The original (single-file) SDXL checkpoint layout that ComfyUI and A1111 load, written from a diffusers pipeline.

One `.safetensors` holds every part under the prefixes of Stability's `generative-models` code:

    model.diffusion_model.              the UNet (input_blocks / middle_block / output_blocks)
    conditioner.embedders.0.transformer.  CLIP-L, transformers names under `text_model.` (base layout)
    conditioner.embedders.1.model.      OpenCLIP bigG, open_clip names: fused `attn.in_proj_weight`,
                                        `text_projection` as a [width, projection] matrix (base layout;
                                        `conditioner.embedders.0.model.` in the refiner layout, which has no CLIP-L)
    first_stage_model.                  the VAE (encoder.down.N.block.M, mid.attn_1 as 1x1 convolutions, ...)

diffusers reads the layout back (`from_single_file`, with `config=` a diffusers folder when offline); this module
writes it: the mapping diffusers → original, derived from the diffusers key names so it holds for any UNet of
the SDXL family (SDXL, SSD-1B's shorter stacks and mid block without attention, the refiner, the tiny models).

A v-prediction expert carries an empty tensor `v_pred` (and `ztsnr` with zero-terminal SNR): ComfyUI's SDXL
detection reads those; the ModelSpec metadata (`modelspec.prediction_type`) says it to other loaders, and
`a1111_yaml` writes the `parameterization: "v"` file A1111 reads beside the checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertune.errors import ModelError
from expertune.io_utils import atomic_write_bytes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _resnet_name(rest: str) -> str:
    for diffusers_name, original in _RESNET:
        if rest.startswith(diffusers_name + "."):
            return original + rest[len(diffusers_name):]
    raise ModelError(f"unexpected UNet resnet parameter {rest!r}: not an SDXL-family UNet")


def unet_to_original(state: Mapping[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A diffusers SDXL-family UNet state dict in the original names (without the `model.diffusion_model.` prefix).

    Down block b, layer l is `input_blocks.{1 + b(L+1) + l}` (L = layers_per_block; `.0` the resnet, `.1` its
    transformer), its downsampler `input_blocks.{1 + b(L+1) + L}.0.op`; mid resnet i is `middle_block.{2i}`,
    the mid transformer `middle_block.1`; up block b (L + 1 layers), layer l is `output_blocks.{b(L+1) + l}`,
    its upsampler the last layer's `.1.conv` (`.2.conv` after a transformer)."""
    if not isinstance(layers_per_block, int):
        raise ModelError(f"UNet layers_per_block {layers_per_block!r}: the original layout needs one int for every block")
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    up_with_attention = {int(m.group(2)) for k in state if (m := _PART.match(k)) and m.group(1) == "up_blocks"
                         and m.group(3) == "attentions"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        head, _, leaf = key.rpartition(".")
        if head in _UNET_TOP:
            out[f"{_UNET_TOP[head]}.{leaf}"] = tensor
            continue
        if (mid := _MID.match(key)) is not None:
            kind, index, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            name = f"middle_block.{2 * index}.{_resnet_name(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
            out[name] = tensor
            continue
        part = _PART.match(key)
        if part is None:
            raise ModelError(f"unexpected UNet parameter {key!r}: not an SDXL-family UNet")
        side, block, kind, layer, rest = part.group(1), int(part.group(2)), part.group(3), int(part.group(4)), part.group(5)
        if side == "down_blocks":
            base = 1 + block * per_down
            if kind == "resnets":
                out[f"input_blocks.{base + layer}.0.{_resnet_name(rest)}"] = tensor
            elif kind == "attentions":
                out[f"input_blocks.{base + layer}.1.{rest}"] = tensor
            else:  # downsamplers.0.conv.*
                out[f"input_blocks.{base + layers_per_block}.0.op.{rest.removeprefix('conv.')}"] = tensor
        else:
            base = block * per_up
            if kind == "resnets":
                out[f"output_blocks.{base + layer}.0.{_resnet_name(rest)}"] = tensor
            elif kind == "attentions":
                out[f"output_blocks.{base + layer}.1.{rest}"] = tensor
            else:  # upsamplers.0.conv.*
                slot = 2 if block in up_with_attention else 1
                out[f"output_blocks.{base + layers_per_block}.{slot}.{rest}"] = tensor
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}


def vae_to_original(state: Mapping[str, torch.Tensor], up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original names (without `first_stage_model.`): decoder up
    blocks in reverse order, mid attention projections as 1x1 convolutions."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):
            out[key] = tensor  # quant_conv, post_quant_conv
            continue
        name = rest
        if (m := re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest)):
            direction, block, kind, layer, leaf = m.groups()
            index = int(block) if direction == "down" else up_blocks - 1 - int(block)
            if kind == "resnets":
                name = f"{direction}.{index}.block.{layer}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                name = f"{direction}.{index}.{'downsample' if direction == 'down' else 'upsample'}.{leaf}"
        elif (m := re.match(r"^mid_block\.resnets\.(\d+)\.(.+)$", rest)):
            name = f"mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.match(r"^mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest)):
            name = f"mid.attn_1.{_VAE_ATTENTION[m.group(1)]}.{m.group(2)}"
            if m.group(2) == "weight" and m.group(1) != "group_norm":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        else:
            head, _, leaf = rest.rpartition(".")
            name = f"{_VAE_TOP.get(head, head)}.{leaf}"
        out[f"{side}.{name}"] = tensor
    return out


def _text_model_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP names with the `text_model.` level (newer transformers flatten CLIPTextModel's)."""
    return {(k if k.startswith("text_model.") or k.startswith("text_projection") else f"text_model.{k}"): v
            for k, v in state.items() if not k.endswith("position_ids")}


def clip_l_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L keeps the transformers names under `text_model.` (the original layout wraps the HF model)."""
    return _text_model_names(state)


_OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def open_clip_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModelWithProjection` (bigG) in open_clip names: q/k/v fused into `attn.in_proj_*`,
    `text_projection` transposed to the [width, projection] matrix open_clip multiplies by."""
    named = _text_model_names(state)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in named.items():
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = tensor
        elif (m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)):
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, leaf), {})[module[-6]] = tensor
                continue
            renamed = dict(_OPEN_CLIP_LAYER).get(module)
            if renamed is None:
                raise ModelError(f"unexpected text encoder 2 parameter {key!r}")
            out[f"transformer.resblocks.{layer}.{renamed}.{leaf}"] = tensor
        else:
            raise ModelError(f"unexpected text encoder 2 parameter {key!r}")
    for (layer, leaf), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


@dataclass(frozen=True)
class Parameterisation:
    """What a loader must know to sample the checkpoint: its target and whether its schedule ends at SNR 0."""

    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    zero_terminal_snr: bool = False
    timestep_range: tuple[int, int] | None = None  # the expert's band, inclusive

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any],
                              timestep_range: tuple[int, int] | None = None) -> Parameterisation:
        return cls(str(config.get("prediction_type", "epsilon")), bool(config.get("rescale_betas_zero_snr", False)),
                   timestep_range)

    @property
    def is_v(self) -> bool:
        return self.prediction_type == "v_prediction"

    def marker_tensors(self) -> dict[str, torch.Tensor]:
        """The empty tensors ComfyUI's SDXL detection reads: `v_pred`, and `ztsnr` beside it for zero-terminal SNR."""
        markers: dict[str, torch.Tensor] = {}
        if self.is_v:
            markers[V_PRED_KEY] = torch.tensor([])
            if self.zero_terminal_snr:
                markers[ZTSNR_KEY] = torch.tensor([])
        return markers

    def metadata(self, *, refiner: bool, title: str) -> dict[str, str]:
        """ModelSpec (`modelspec.*`) safetensors metadata, strings only."""
        meta = {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-refiner" if refiner else "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": title,
            "modelspec.prediction_type": "v" if self.is_v else self.prediction_type,
            "modelspec.zero_terminal_snr": "true" if self.zero_terminal_snr else "false",
        }
        if self.timestep_range is not None:
            meta["modelspec.timestep_range"] = f"{self.timestep_range[0]},{self.timestep_range[1]}"
        return meta


def pipeline_state_dict(unet: Any, vae: Any, text_encoder_1: Any | None, text_encoder_2: Any,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL-family pipeline in the original single-file layout; `text_encoder_1` None is the
    refiner layout (bigG under `conditioner.embedders.0.model.`). `dtype` casts floating tensors."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    parts: list[tuple[str, dict[str, torch.Tensor]]] = [
        (UNET_PREFIX, unet_to_original(unet.state_dict(), unet.config.layers_per_block)),
        (VAE_PREFIX, vae_to_original(vae.state_dict(), len(vae.config.up_block_types))),
    ]
    if text_encoder_1 is not None:
        parts.append((CLIP_L_PREFIX, clip_l_to_original(text_encoder_1.state_dict())))
    parts.append((BIGG_PREFIX if text_encoder_1 is not None else REFINER_BIGG_PREFIX,
                  open_clip_to_original(text_encoder_2.state_dict())))
    return {prefix + key: cast(tensor) for prefix, names in parts for key, tensor in names.items()}


def save_single_file(pipeline: Any, path: str | os.PathLike, parameterisation: Parameterisation, *,
                     precision: str = "fp32", title: str | None = None) -> Path:
    """Write the pipeline as one original-layout `.safetensors` (atomically), with the parameterisation markers
    and ModelSpec metadata; a v-prediction expert also gets the A1111 `.yaml` beside it."""
    from safetensors.torch import save_file

    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    target = Path(path)
    refiner = getattr(pipeline, "text_encoder", None) is None
    state = pipeline_state_dict(pipeline.unet, pipeline.vae, getattr(pipeline, "text_encoder", None),
                                pipeline.text_encoder_2, PRECISIONS[precision])
    state.update(parameterisation.marker_tensors())
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.partial")
    try:
        save_file(state, str(scratch), metadata=parameterisation.metadata(refiner=refiner, title=title or target.stem))
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    if parameterisation.is_v:
        atomic_write_bytes(target.with_suffix(".yaml"), a1111_yaml(refiner=refiner).encode("utf-8"))
    return target


def a1111_yaml(*, refiner: bool) -> str:
    """The model config A1111 reads beside a v-prediction SDXL checkpoint (`parameterization: "v"`)."""
    target = "sgm.models.diffusion.DiffusionEngine"
    return (f"# written by expertune: this SDXL{' refiner' if refiner else ''} checkpoint predicts v, not noise\n"
            "model:\n"
            f"  target: {target}\n"
            "  params:\n"
            '    parameterization: "v"\n'
            "    denoiser_config:\n"
            "      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser\n"
            "      params:\n"
            "        num_idx: 1000\n"
            "        scaling_config:\n"
            "          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n"
            "        discretization_config:\n"
            "          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization\n")
