"""Honest step timing: seconds per optimizer step read after the accelerator has finished it, its parts, throughput
and model FLOP utilisation (issue 25, item 1).

A CUDA (or XPU / MPS) device runs kernels asynchronously: reading the clock when Python reaches the end of the
step measures how fast the host queued work, not how long the device took. `StepClock.finish` synchronises first,
so a step's "seconds" include the clipping, the optimizer and the EMA update. With `timing_breakdown_interval` N,
every N-th step also synchronises between its parts and logs `seconds_data` (reading, collating and copying the
batches), `seconds_compute` (forward and backward) and `seconds_optimizer` (clipping, optimizer, LR schedule, EMA).
The extra synchronisations cost a little, which is why they are not taken every step. On a CPU everything is
synchronous and nothing waits.

FLOPs: once per run, the trained UNet's layout (its config) is built on PyTorch's `meta` device (shapes only: no
memory, no numbers) and run forward and backward on one sample of the first batch's shapes under torch's
`FlopCounterMode`. Counting the real step instead would change its numbers: under a dispatch mode attention takes
another kernel. These are model FLOPs: gradient checkpointing's recomputed forward and LoRA adapters' small
matmuls are not counted, as MFU is usually defined. From them each step logs `tflops` (achieved per process) and,
where the peak is known (`--peak_tflops`, or the datasheet figure of a recognised GPU in the run's precision), `mfu`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets (SXM parts): bf16/fp16 tensor, TF32 tensor, fp32.
KNOWN_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4, 494.7, 66.9),
    "H100": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "A10G": (70.0, 35.0, 31.2),
    "L4": (121.0, 60.0, 30.3),
}


def synchronize(device: torch.device) -> None:
    """Wait for every kernel queued on `device` (no-op on a CPU, which computes synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None) if device.type in ("xpu", "mps", "npu") else None
    if callable(sync):
        sync()


def known_peak_tflops(device: torch.device, mixed_precision: str, tf32: bool) -> float | None:
    """The datasheet peak of a recognised CUDA GPU for the run's precision, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32_peak, fp32) in KNOWN_PEAKS.items():
        if key in name:
            if mixed_precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else fp32
    return None


class StepClock:
    """The wall time of one optimizer step, and (when `breakdown`) of its data, compute and optimizer parts."""

    PARTS = ("data", "compute", "optimizer")

    def __init__(self, device: torch.device, breakdown: bool) -> None:
        self.device = device
        self.breakdown = breakdown
        self.parts = dict.fromkeys(self.PARTS, 0.0)
        self.started = self._last = time.perf_counter()

    def mark(self, part: str) -> None:
        """The time since the previous mark belongs to `part` (measured only when breaking the step down)."""
        if not self.breakdown:
            return
        synchronize(self.device)
        now = time.perf_counter()
        self.parts[part] += now - self._last
        self._last = now

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of bookkeeping (counting FLOPs) out of the step and of its current part."""
        self.started += seconds
        self._last += seconds

    def finish(self) -> float:
        """Seconds from the start of the step until the device has finished all of it."""
        synchronize(self.device)
        return time.perf_counter() - self.started


class StepMeter:
    """Throughput and FLOP accounting across a run's steps; makes each step's `StepClock`."""

    def __init__(self, device: torch.device, breakdown_interval: int | None = None, peak_tflops: float | None = None,
                 count_flops: bool = True) -> None:
        self.device = device
        self.breakdown_interval = breakdown_interval
        self.peak_tflops = peak_tflops
        self.count_flops = count_flops
        self.flops_per_sample: float | None = None

    def clock(self, step: int) -> StepClock:
        every = self.breakdown_interval
        return StepClock(self.device, bool(every) and step % every == 0)  # type: ignore[operator]

    def count(self, unet_config: dict[str, Any] | None, latent_shape: tuple[int, ...], text_tokens: int = 77,
              pooled: int = 1280, unet_class: type | None = None, clock: StepClock | None = None) -> None:
        """Counts the training FLOPs per sample of the UNet `unet_config` (see `training_flops`) once per run; a
        layout that cannot be counted leaves them unknown (no tflops, no mfu), never stops the run. The time it
        takes is left out of `clock`'s step."""
        if not self.count_flops or self.flops_per_sample is not None:
            return
        self.count_flops = False
        started = time.perf_counter()
        try:
            self.flops_per_sample = training_flops(unet_config or {}, latent_shape, text_tokens, pooled, unet_class)
        except Exception as error:  # noqa: BLE001 - a figure for the logs, not worth a failed run
            log.info("training FLOPs not counted (%s: %s): no tflops or mfu in metrics.jsonl",
                     type(error).__name__, error)
            return
        finally:
            if clock is not None:
                clock.exclude(time.perf_counter() - started)
        log.info("FLOPs per training sample (forward + backward, counted): %.3g%s", self.flops_per_sample,
                 f"; MFU against a peak of {self.peak_tflops:g} TFLOP/s" if self.peak_tflops else "")

    def figures(self, clock: StepClock, seconds: float, global_samples: int, rank_samples: int) -> dict[str, float]:
        """The step's throughput fields for metrics.jsonl."""
        figures: dict[str, float] = {"seconds": round(seconds, 6),
                                     "samples_per_second": round(global_samples / max(seconds, 1e-9), 4)}
        if self.flops_per_sample is not None:
            achieved = self.flops_per_sample * rank_samples / max(seconds, 1e-9) / 1e12
            figures["tflops"] = round(achieved, 6)
            if self.peak_tflops:
                figures["mfu"] = round(achieved / self.peak_tflops, 6)
        if clock.breakdown:
            figures |= {f"seconds_{part}": round(value, 6) for part, value in clock.parts.items()}
        return figures


def training_flops(unet_config: dict[str, Any], latent_shape: tuple[int, ...], text_tokens: int = 77,
                   pooled: int = 1280, unet_class: type | None = None) -> float:
    """FLOPs of one training sample (forward and backward) of the diffusers UNet `unet_config` at `latent_shape`
    ([C, h, w]) with `text_tokens` tokens and a `pooled`-wide pooled text embedding, counted with
    `FlopCounterMode` on the meta device (no memory, no weights). `unet_class`: the trained UNet's class (default
    diffusers' UNet2DConditionModel; passing the class already loaded spares importing diffusers' model zoo)."""
    from torch.utils.flop_counter import FlopCounterMode

    if unet_class is None:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

        unet_class = UNet2DConditionModel
    with torch.device("meta"):
        unet = unet_class.from_config(dict(unet_config))  # type: ignore[union-attr]
    config = unet.config
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":  # SDXL's six time ids, the refiner's five: what the width leaves
        count = (int(config.projection_class_embeddings_input_dim) - pooled) // int(config.addition_time_embed_dim)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, device="meta"),
                                       "time_ids": torch.empty(1, count, device="meta")}
    latents = torch.empty(1, *latent_shape, device="meta", requires_grad=True)
    text = torch.empty(1, text_tokens, int(config.cross_attention_dim), device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = unet(latents, torch.tensor([500], device="meta"), encoder_hidden_states=text, **kwargs).sample
        out.sum().backward()
    return float(counter.get_total_flops())
