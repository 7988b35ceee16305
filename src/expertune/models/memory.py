"""What training a UNet layout needs in accelerator memory and compute, computed from the layout alone.

The UNet is built from its config on PyTorch's `meta` device (shapes only: no weights, no memory, no
download) and run forward once at a latent size with saved-tensor hooks counting what autograd keeps for the
backward pass, and under `FlopCounterMode` counting the matmul/convolution FLOPs. Attention is counted as a
fused (flash / memory-efficient) kernel keeps it: q, k, v, the output and one float per query row, never the
attention matrix. Nothing here is measured on a GPU; allocator overhead, CUDA context (~0.5-1 GiB) and
fragmentation come on top. docs/memory.md is generated from `memory_table()`; `expertune init` sizes its
settings with `estimate()`.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GIB = 1024**3

# Bytes per trained parameter of each optimizer's state (the model's own weights and gradients excluded).
# adafactor: factored second moments (a row and a column vector per matrix), counted exactly per parameter.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_bf16": 6.0, "adamw8bit": 2.0, "prodigy": 16.0}


class _FusedAttentionProcessor:
    """diffusers' SDPA attention for the SDXL UNet's blocks, autograd-saving what a fused kernel saves."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        split = [t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v)]
        out = _FusedAttention.apply(*split)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = F.scaled_dot_product_attention(q, k, v)
        row_stats = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # flash's logsumexp
        ctx.save_for_backward(q, k, v, out, row_stats)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        raise NotImplementedError("a counting kernel: forward only")


@dataclass(frozen=True)
class LayoutCost:
    """One UNet layout at one latent size, per sample (batch 1)."""

    parameters: int
    adafactor_state: int  # floats of adafactor's factored state
    activations: int  # bytes autograd keeps for backward, no gradient checkpointing (fp32)
    activations_checkpointed: int  # bytes with diffusers' gradient checkpointing (peak, fp32)
    forward_flops: float


def _unet_config(name: str) -> dict[str, Any]:
    from expertune.models.layouts import sdxl_unet_config, ssd1b_unet_config

    return {"sdxl": sdxl_unet_config, "ssd-1b": ssd1b_unet_config}[name]()


STORED = Path(__file__).with_name("layout_costs.json")  # compute_layout_cost's results at 1024 px (a test checks)


def layout_cost(name: str, pixels: int = 1024) -> LayoutCost:
    """The cost of the UNet `name` ("ssd-1b" or "sdxl") on a square `pixels` image: stored for 1024 px (computing
    takes seconds), else computed."""
    if pixels == 1024:
        stored = json.loads(STORED.read_text(encoding="utf-8"))
        if name in stored:
            return LayoutCost(**stored[name])
    return compute_layout_cost(name, pixels)


@lru_cache(maxsize=None)
def compute_layout_cost(name: str, pixels: int = 1024) -> LayoutCost:
    """The cost of the UNet `name` ("ssd-1b" or "sdxl") on a square `pixels` image (latent pixels / 8), from its
    config on the meta device."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config(name))
    unet.set_attn_processor(_FusedAttentionProcessor())  # type: ignore[arg-type]
    params = list(unet.parameters())
    factored = sum(p.shape[0] + math.prod(p.shape[1:]) if p.dim() >= 2 else p.numel() for p in params)

    side = pixels // 8
    latents = torch.empty(1, 4, side, side, device="meta", requires_grad=False)
    text = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")
    added = {"text_embeds": torch.empty(1, 1280, device="meta"), "time_ids": torch.empty(1, 6, device="meta")}
    timesteps = torch.tensor([500], device="meta")

    # diffusers checkpoints each ResnetBlock2D and transformer block: attribute saved bytes to the unit running.
    units: list[int] = []  # saved bytes of each checkpointed unit
    unit_inputs: list[int] = []
    stack: list[int] = []
    outside = [0]
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen and not isinstance(t, torch.nn.Parameter):
            seen[id(t)] = t
            size = t.numel() * t.element_size()
            if stack:
                units[stack[-1]] += size
            else:
                outside[0] += size
        return t

    def enter(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not stack:
            units.append(0)
            unit_inputs.append(sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))
            stack.append(len(units) - 1)
        else:
            stack.append(stack[-1])

    def leave(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack.pop()

    checkpointed = [m for m in unet.modules() if isinstance(m, ResnetBlock2D) or type(m).__name__ == "BasicTransformerBlock"]
    with ExitStack() as hooks:
        for module in checkpointed:
            hooks.callback(module.register_forward_pre_hook(enter).remove)
            hooks.callback(module.register_forward_hook(leave).remove)
        counter = FlopCounterMode(display=False)
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added)
    assert any(isinstance(m, Attention) for m in unet.modules())
    total = outside[0] + sum(units)
    peak_checkpointed = outside[0] + sum(unit_inputs) + max(units)
    return LayoutCost(sum(p.numel() for p in params), factored, total, peak_checkpointed,
                      float(counter.get_total_flops()))


@dataclass(frozen=True)
class MemoryEstimate:
    """Accelerator memory of full-UNet training, in bytes (no CUDA context, no allocator slack)."""

    weights: float
    gradients: float
    optimizer_state: float
    activations: float  # for the whole micro-batch

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state + self.activations


def estimate(name: str, optimizer: str, batch_size: int = 1, gradient_checkpointing: bool = True,
             mixed_precision: str = "bf16", pixels: int = 1024) -> MemoryEstimate:
    """Memory of training the UNet `name` with expertune's settings: weights and gradients in float32 (bfloat16
    with optimizer=adamw_bf16), autocast activations in `mixed_precision` (half the float32 bytes in bf16/fp16)."""
    cost = layout_cost(name, pixels)
    weight_bytes = 2.0 if optimizer == "adamw_bf16" else 4.0
    state = 4.0 * cost.adafactor_state if optimizer == "adafactor" else OPTIMIZER_STATE_BYTES[optimizer] * cost.parameters
    per_sample = cost.activations_checkpointed if gradient_checkpointing else cost.activations
    scale = 0.5 if mixed_precision in ("bf16", "fp16") else 1.0
    return MemoryEstimate(cost.parameters * weight_bytes, cost.parameters * weight_bytes, state,
                          per_sample * scale * batch_size)


def memory_table(pixels: int = 1024) -> str:
    """The Markdown tables of docs/memory.md."""
    lines = [f"### Per model at {pixels}x{pixels} (latents {pixels // 8}x{pixels // 8}), batch 1", "",
             "| model | UNet parameters | weights fp32 | gradients fp32 | activations / sample, fp32 | "
             "activations / sample, gradient checkpointing, fp32 | forward TFLOP / sample | training TFLOP / sample "
             "(3x forward; 4x with checkpointing) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("ssd-1b", "sdxl"):
        c = layout_cost(name, pixels)
        lines.append(f"| {name} | {c.parameters / 1e9:.3f} B | {4 * c.parameters / GIB:.1f} GiB | "
                     f"{4 * c.parameters / GIB:.1f} GiB | {c.activations / GIB:.1f} GiB | "
                     f"{c.activations_checkpointed / GIB:.2f} GiB | {c.forward_flops / 1e12:.1f} | "
                     f"{3 * c.forward_flops / 1e12:.1f} / {4 * c.forward_flops / 1e12:.1f} |")
    lines += ["", "### Optimizer state, per model", "", "| optimizer | bytes / parameter | ssd-1b | sdxl |",
              "|---|---|---|---|"]
    for optimizer in ("adamw", "adamw_bf16", "adamw8bit", "adafactor", "prodigy"):
        sizes = [estimate(n, optimizer, pixels=pixels).optimizer_state for n in ("ssd-1b", "sdxl")]
        per = "factored (≈0)" if optimizer == "adafactor" else f"{OPTIMIZER_STATE_BYTES[optimizer]:g}"
        lines.append(f"| {optimizer} | {per} | {sizes[0] / GIB:.2f} GiB | {sizes[1] / GIB:.2f} GiB |")
    lines += ["", "### Whole training step, bf16 autocast, gradient checkpointing, batch 1 and 4", "",
              "| model | optimizer | batch 1 | batch 4 |", "|---|---|---|---|"]
    for name in ("ssd-1b", "sdxl"):
        for optimizer in ("adamw", "adamw_bf16", "adamw8bit", "adafactor"):
            one, four = (estimate(name, optimizer, b).total / GIB for b in (1, 4))
            lines.append(f"| {name} | {optimizer} | {one:.1f} GiB | {four:.1f} GiB |")
    lines += ["", f"### Time, estimated: {ASSUMED_UTILISATION:.0%} of an H200's dense bf16 peak "
              f"({H200_BF16_PEAK / 1e12:.0f} TFLOP/s)", "",
              "| model | gradient checkpointing | seconds / training image | hours / 10,000 steps of batch 8 |",
              "|---|---|---|---|"]
    for name in ("ssd-1b", "sdxl"):
        for checkpointing in (False, True):
            seconds = training_seconds_per_image(name, checkpointing)
            lines.append(f"| {name} | {str(checkpointing).lower()} | {seconds:.3f} | {seconds * 80_000 / 3600:.1f} |")
    return "\n".join(lines) + "\n"


H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, NVIDIA's datasheet
ASSUMED_UTILISATION = 0.4  # an assumption, not a measurement


def training_seconds_per_image(name: str, gradient_checkpointing: bool, pixels: int = 1024) -> float:
    """Forward + backward (2x forward) + the recomputed forward with checkpointing, at the assumed utilisation."""
    flops = (4 if gradient_checkpointing else 3) * layout_cost(name, pixels).forward_flops
    return flops / (ASSUMED_UTILISATION * H200_BF16_PEAK)


def stored_costs() -> str:
    """The text of layout_costs.json, computed."""
    return json.dumps({name: asdict(compute_layout_cost(name)) for name in ("ssd-1b", "sdxl")}, indent=1) + "\n"


if __name__ == "__main__":  # python -m expertune.models.memory [--store]: the tables of docs/memory.md
    import sys

    if "--store" in sys.argv:
        STORED.write_text(stored_costs(), encoding="utf-8")
    print(memory_table(), end="")
