"""A blended hand-off (`--handoff_blend W`): near each boundary of a chain, both experts' predictions, mixed.

Without it each inference step runs the expert that owns its timestep, and the hand-off is a hard switch. With a
window of W timesteps, a step whose timestep t lies within W/2 of a boundary c (between t = b - 1 and t = b, where
the expert above owns b) runs both neighbours and mixes their predictions linearly:

    prediction(t) = (1 - a) · upper(t) + a · lower(t),    a = clamp((c + W/2 - t) / W, 0, 1),   c = b - 1/2

so the lower expert's share rises from 0 at the window's top to 1 at its bottom (1/2 at the boundary). Outside
every window a step runs the stage's own expert alone, exactly as without a blend. The mix is of the UNet outputs (ε or v, whatever the experts predict),
before classifier-free guidance, which is linear and so commutes with it; the stage's own guidance applies.

`HandoffUNet` does this as a drop-in `unet` for any diffusers SDXL pipeline (it presents the owning expert's
config), so the chain keeps its stages and their `denoising_start` / `denoising_end`; docs/mixtures.md shows the
same with plain diffusers. Both experts see the running stage's text conditioning, so the experts must share the
layout (no refiner-layout expert) and load as whole UNets (a LoRA chain switches adapters on one UNet: refused).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from expertune.errors import ConfigError
from expertune.experts import ExpertBand


def blend_weights(timestep: float, bands: Sequence[ExpertBand], window: int, own: int) -> dict[int, float]:
    """{expert index: weight} of the prediction at `timestep` in the stage of expert `own` of a chain of `bands`
    (chain order): both neighbours inside a window, else the stage's own expert alone (as without a blend)."""
    t = float(timestep)
    half = window / 2
    for k in range(len(bands) - 1):
        centre = bands[k].lo - 0.5
        if window > 0 and abs(t - centre) < half:
            lower = min(max((centre + half - t) / window, 0.0), 1.0)
            return {k: 1.0 - lower, k + 1: lower}
    return {own: 1.0}


def check_window(window: int, bands: Sequence[ExpertBand]) -> None:
    """A window must be shorter than every band (two windows never meet)."""
    if window < 0:
        raise ConfigError(f"--handoff_blend {window}: give a window of timesteps >= 0 (0: a hard hand-off)")
    narrowest = min(bands, key=lambda band: band.size)
    if window and window >= narrowest.size:
        raise ConfigError(f"--handoff_blend {window} is not shorter than the band {narrowest} ({narrowest.size} "
                          f"timesteps): use a window below {narrowest.size}")


class HandoffUNet(torch.nn.Module):
    """The UNet of stage `own` of a chain whose steps near a boundary mix both neighbours' predictions."""

    def __init__(self, unets: Sequence[torch.nn.Module], bands: Sequence[ExpertBand], window: int, own: int) -> None:
        super().__init__()
        self.unets = torch.nn.ModuleList(unets)
        self.bands = list(bands)
        self.window = window
        self.own = own
        self.config = unets[own].config  # what the pipeline reads: sample size, time embedding, ...
        self.add_embedding = getattr(unets[own], "add_embedding", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unets[self.own].parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unets[self.own].parameters()).device

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        mixed: torch.Tensor | None = None
        for index, weight in blend_weights(t, self.bands, self.window, self.own).items():
            if weight == 0.0:
                continue
            out = self.unets[index](sample, timestep, *args, return_dict=False, **kwargs)[0]
            mixed = out * weight if mixed is None else mixed + out * weight
        assert mixed is not None
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=mixed)
        return (mixed,)


def blended_stages(stages: Sequence[Any], window: int) -> list[Any]:
    """The chain's stages (`infer.chain.ChainStage`), each with a `HandoffUNet` over every stage's UNet."""
    bands = [stage.band for stage in stages]
    check_window(window, bands)
    if not window or len(stages) < 2:
        return list(stages)
    for stage in stages:
        if stage.requires_aesthetics_score or stage.adapter is not None:
            kind = "a refiner-layout expert" if stage.requires_aesthetics_score else "a LoRA expert"
            raise ConfigError(f"--handoff_blend: the chain has {kind} (band {stage.band}); a blended hand-off runs "
                              "two experts on one stage's conditioning, so it needs full experts of the base layout. "
                              "Drop --handoff_blend for this chain")
    unets = [stage.components["unet"] for stage in stages]
    return [replace(stage, components={**stage.components, "unet": HandoffUNet(unets, bands, window, own=k)})
            for k, stage in enumerate(stages)]
