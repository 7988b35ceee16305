"""Numbers measured at each validation: CLIP score of the images, and the held-out loss per sub-band.

CLIP score (REFERENCE.md §5) is torchmetrics' `CLIPScore`: `max(100 * cos(E_image, E_text), 0)`, on 0..100.
It is reported per prompt (`clip/<name>`, one image each) and as the mean of those (`clip/mean`).

The per-band loss is the training loss (MSE against the trained parameterisation's target) on images held
out of training, with noise and timesteps fixed once for the whole run, so two validations differ only
by the weights. The expert's band is cut into equal sub-bands (`sub_bands`), each scored at fixed
timesteps (`fixed_timesteps`); keys are `eval/loss_<lo>_<hi>` (inclusive ends) and `eval/loss`, the mean
of the sub-bands. The forward passes run under the run's autocast (as training does), batched over held-out
images of one size (`batch_rows` rows a pass); validation scores at most `eval_holdout_max_images` of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch

from expertune.errors import ModelError
from expertune.experts import ExpertBand, fixed_timesteps, sub_bands
from expertune.data.batches import TrainingBatch
from expertune.schedule import NoiseSchedule
from expertune.objective.loss import StepRandomness, denoising_loss

log = logging.getLogger(__name__)


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose `get_image_features`/`get_text_features` return the projected embeddings as tensors.

    transformers 5 returns model outputs (the projection in `pooler_output`) where torchmetrics 1.9
    expects tensors; torchmetrics accepts any model with these two methods.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def load_clip(model_name_or_path: str) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a local directory or a hub id; ModelError when it cannot be loaded."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(model_name_or_path)
        processor = CLIPProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"pretrained_evaluation_model_name_or_path={model_name_or_path!r}: cannot load a CLIP model and "
            f"processor from it ({str(error).splitlines()[0]}); give a local directory holding a CLIPModel and "
            "CLIPProcessor (e.g. one saved by `expertune tiny-clip DIR`), or a hub id reachable from here"
        ) from None
    model.eval().requires_grad_(False)
    return model, processor


class ClipScorer:
    """torchmetrics `CLIPScore` over a CLIP model loaded once."""

    def __init__(self, model_name_or_path: str, device: torch.device | str = "cpu") -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        model, processor = load_clip(model_name_or_path)
        features = _ProjectedFeatures(model)
        self.device = torch.device(device)
        # The metric's states and the CLIP model on the device the images are scored on.
        self.metric = CLIPScore(model_name_or_path=lambda: (features, processor)).to(self.device)

    @staticmethod
    def _tensor(image: Any) -> torch.Tensor:
        """A PIL image as the uint8 [3, H, W] tensor torchmetrics' examples use."""
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)

    @torch.no_grad()
    def score(self, image: Any, prompt: str) -> float:
        """CLIP score of one image against one prompt, in [0, 100]."""
        self.metric.reset()
        self.metric.update(self._tensor(image).to(self.device), [prompt])
        return float(self.metric.compute())

    def scores(self, named: Sequence[tuple[str, Any, str]]) -> dict[str, float]:
        """`clip/<name>` for each (name, image, prompt), and `clip/mean` of them."""
        values = {f"clip/{name}": self.score(image, prompt) for name, image, prompt in named}
        if values:
            values["clip/mean"] = sum(values.values()) / len(values)
        return values


@dataclass(frozen=True)
class HeldOutSample:
    """One held-out image as training would see it: cached latent, time ids, text embeddings."""

    latent: torch.Tensor  # [4, h, w], scaled
    time_ids: torch.Tensor  # [6] (the refiner layout: [5])
    prompt_embeds: torch.Tensor  # [77, d]
    pooled_embeds: torch.Tensor  # [d_pool]


def loss_key(band: ExpertBand) -> str:
    return f"eval/loss_{band.lo}_{band.hi}"


class HeldOutLoss:
    """The denoising loss on held-out samples at fixed noise and timesteps, per sub-band of the band."""

    def __init__(self, samples: Sequence[HeldOutSample], band: ExpertBand, schedule: NoiseSchedule, *,
                 subbands: int, timesteps_per_subband: int, seed: int, batch_rows: int = 16) -> None:
        self.samples = list(samples)
        self.batch_rows = batch_rows
        self.schedule = schedule
        self.subbands = sub_bands(band, min(subbands, band.size))
        self.timesteps = [torch.tensor(fixed_timesteps(sub, timesteps_per_subband)) for sub in self.subbands]
        generator = torch.Generator().manual_seed(seed)
        # noise[i][j]: [timesteps_per_subband, 4, h, w] for sample i, sub-band j — drawn once, reused always.
        self.noise = [[torch.randn((timesteps_per_subband, *s.latent.shape), generator=generator)
                       for _ in self.subbands] for s in self.samples]

    @torch.no_grad()
    def __call__(self, unet: Any, device: torch.device | str,
                 autocast: Callable[[], AbstractContextManager[Any]] | None = None) -> dict[str, float]:
        """`eval/loss_<lo>_<hi>` per sub-band and `eval/loss`: the mean over images of each image's mean loss over
        the sub-band's fixed timesteps. `autocast`: the run's (accelerator.autocast), around each forward pass."""
        if not self.samples:
            return {}
        dtype = next(unet.parameters()).dtype
        totals = [0.0] * len(self.subbands)
        for j, timesteps in enumerate(self.timesteps):
            group: list[int] = []  # consecutive images of one latent size, up to batch_rows rows
            for index, sample in enumerate(self.samples):
                if group and (self.samples[group[0]].latent.shape != sample.latent.shape
                              or (len(group) + 1) * timesteps.numel() > self.batch_rows):
                    totals[j] += self._group_loss(unet, group, j, device, dtype, autocast)
                    group = []
                group.append(index)
            totals[j] += self._group_loss(unet, group, j, device, dtype, autocast)
        per_band = {loss_key(sub): total / len(self.samples) for sub, total in zip(self.subbands, totals)}
        per_band["eval/loss"] = sum(per_band.values()) / len(per_band)
        return per_band

    def _group_loss(self, unet: Any, group: list[int], subband: int, device: torch.device | str, dtype: torch.dtype,
                    autocast: Callable[[], AbstractContextManager[Any]] | None) -> float:
        """The sum over the images of `group` of each one's mean loss at sub-band `subband`'s timesteps: one pass."""
        timesteps = self.timesteps[subband]
        count = timesteps.numel()
        samples = [self.samples[i] for i in group]
        batch = TrainingBatch(torch.cat([s.latent.unsqueeze(0).expand(count, -1, -1, -1) for s in samples]),
                              torch.cat([s.prompt_embeds.expand(count, -1, -1) for s in samples]),
                              torch.cat([s.pooled_embeds.expand(count, -1) for s in samples]),
                              torch.cat([s.time_ids.expand(count, -1) for s in samples])).to(device)
        draws = StepRandomness(timesteps.repeat(len(group)), torch.cat([self.noise[i][subband] for i in group]),
                               torch.ones(count * len(group), dtype=torch.bool))
        with autocast() if autocast is not None else nullcontext():
            loss = denoising_loss(unet, batch, self.schedule, draws, model_dtype=dtype).loss
        return float(loss) * len(group)  # the mean over equal-sized parts times their number: the sum of their means
