"""Contrastive training on the world: the evaluation CLIP, and the two SDXL text encoders as CLIP text towers.

Both use the symmetric cross-entropy of CLIP (Radford et al. 2021) over a batch of distinct captions, so no
batch holds two positives for one caption. The evaluation CLIP is a `CLIPModel` saved with its
`CLIPProcessor`; the conditioning model is a second, separately seeded CLIP whose text tower becomes
`text_encoder_2` (a `CLIPTextModelWithProjection`) and which trains a `CLIPTextModel` beside it as
`text_encoder_1` (its pooled output through a projection used only here). Both are frozen afterwards, as in SDXL.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expertune.models.layouts import TextEncoderShape
from expertune.models.tiny import MAX_TOKENS, _text_encoder_config
from expertune.world.optim import warmup_cosine
from expertune.world.scene import RADIUS_RANGE, Combination, all_combinations, render, scenes

log = logging.getLogger(__name__)

EVAL_TEXT = TextEncoderShape(64, 3, 4, 128, 64)
TEXT_ENCODER_1 = TextEncoderShape(32, 3, 2, 64, 32)
TEXT_ENCODER_2 = TextEncoderShape(64, 3, 4, 128, 64)


@dataclass(frozen=True)
class ClipRecipe:
    steps: int = 1500
    batch: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    image_size: int = 32  # the image tower's input (the processor resizes the 64 px world images to it)
    patch_size: int = 4
    vision_layers: int = 3
    shape_siblings: bool = False  # batches of whole colour pairs (every shape of a pair): hard negatives for shape
    # The circumradii of the training scenes (None: the world's own). A wider range than the world's makes a
    # shape's area useless as a cue to which shape it is (see `_Batches`).
    radius_range: tuple[float, float] | None = None


def vision_config(projection_dim: int, recipe: ClipRecipe) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=recipe.vision_layers, num_attention_heads=4,
                image_size=recipe.image_size, patch_size=recipe.patch_size, projection_dim=projection_dim)


def image_processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def text_config(shape: TextEncoderShape, tokenizer) -> dict:
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return _text_encoder_config(shape, ids).to_dict()


def token_ids(tokenizer, captions: list[str], *, to_longest: bool = False) -> torch.Tensor:
    """Padded to 77 tokens without an attention mask: how the SDXL pipeline encodes prompts.

    `to_longest`: padded only to the longest caption. CLIP's text tower is causal and pools at the end
    token, so the pooled features (and their gradients) are the same, for a ninth of the work.
    """
    return tokenizer(captions, padding="longest" if to_longest else "max_length", max_length=MAX_TOKENS,
                     truncation=True, return_tensors="pt").input_ids


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _Batches:
    """Seeded batches of distinct captions, each with a fresh scene.

    With `shape_siblings`, a batch is whole colour pairs with every shape of each pair, so each caption meets
    its shape siblings as negatives: colours alone tell most captions apart, and without these hard
    negatives a tower learns shapes last.

    `radius_range` widens the scenes' sizes. At the world's own circumradii (0.27-0.38 of the side) a square
    covers less than a circle and more than a triangle of the same radius, and the ranges of their areas
    overlap only in part: a tower that learns "how much of the image is foreground" gets most shapes right,
    stops there, and confuses the square with its two neighbours (all of an 82 % tower's errors). Drawn
    from 0.18-0.45, the areas overlap almost entirely and only the outline tells the shapes apart.
    """

    def __init__(self, combinations: list[Combination], batch: int, seed: int, processor,
                 shape_siblings: bool = False, radius_range: tuple[float, float] | None = None) -> None:
        self.combinations, self.batch = combinations, min(batch, len(combinations))
        self.groups: dict[tuple[str, str], list[Combination]] = {}
        for combination in combinations:
            self.groups.setdefault((combination.fg, combination.bg), []).append(combination)
        self.pairs = sorted(self.groups)
        self.shape_siblings = shape_siblings
        self.radius_range = (radius_range[0], radius_range[1]) if radius_range is not None else None
        self.rng, self.processor = random.Random(seed), processor

    def _captions(self) -> list[Combination]:
        if not self.shape_siblings:
            return self.rng.sample(self.combinations, self.batch)
        pairs = self.rng.sample(self.pairs, max(1, min(len(self.pairs), self.batch // 3)))
        return [c for pair in pairs for c in self.groups[pair]]

    def next(self) -> tuple[list[str], torch.Tensor]:
        chosen = self._captions()
        drawn = scenes(chosen, 1, self.rng.randrange(2**31), radius_range=self.radius_range or RADIUS_RANGE)
        pixels = self.processor(images=[render(s) for s in drawn], return_tensors="pt").pixel_values
        return [s.caption for s in drawn], pixels


def train_eval_clip(tokenizer, combinations: list[Combination], recipe: ClipRecipe, log_every: int = 100):
    """The evaluation CLIP: (CLIPModel, CLIPProcessor, loss rows)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    torch.manual_seed(recipe.seed)
    model = CLIPModel(CLIPConfig(text_config=text_config(EVAL_TEXT, tokenizer),
                                 vision_config=vision_config(64, recipe), projection_dim=64))
    processor = CLIPProcessor(image_processor=image_processor(recipe.image_size), tokenizer=tokenizer)
    batches = _Batches(combinations, recipe.batch, recipe.seed, processor.image_processor, recipe.shape_siblings,
                       recipe.radius_range)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(recipe.steps))
    rows = []
    model.train()
    for step in range(recipe.steps):
        captions, pixels = batches.next()
        image = _tensor(model.get_image_features(pixel_values=pixels))
        text = _tensor(model.get_text_features(input_ids=token_ids(tokenizer, captions, to_longest=True)))
        loss = contrastive_loss(image, text, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == recipe.steps - 1:
            rows.append({"part": "eval_clip", "step": step, "loss": round(loss.item(), 6)})
            log.info("eval clip step %d/%d loss %.4f", step, recipe.steps, loss.item())
    model.eval()
    return model, processor, rows


def train_text_encoders(tokenizer_1, tokenizer_2, combinations: list[Combination], recipe: ClipRecipe,
                        log_every: int = 100):
    """SDXL's two text encoders trained as text towers against one image tower: (te1, te2, loss rows)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTextConfig

    torch.manual_seed(recipe.seed)
    clip = CLIPModel(CLIPConfig(text_config=text_config(TEXT_ENCODER_2, tokenizer_2),
                                vision_config=vision_config(TEXT_ENCODER_2.projection_dim, recipe),
                                projection_dim=TEXT_ENCODER_2.projection_dim))
    text_1 = CLIPTextModel(CLIPTextConfig(**text_config(TEXT_ENCODER_1, tokenizer_1)))
    head_1 = torch.nn.Linear(TEXT_ENCODER_1.width, TEXT_ENCODER_2.projection_dim, bias=False)
    scale_1 = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    parameters = [*clip.parameters(), *text_1.parameters(), *head_1.parameters(), scale_1]
    batches = _Batches(combinations, recipe.batch, recipe.seed, image_processor(recipe.image_size),
                       recipe.shape_siblings)
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(recipe.steps))
    rows = []
    for step in range(recipe.steps):
        captions, pixels = batches.next()
        image = _tensor(clip.get_image_features(pixel_values=pixels))
        text_2 = _tensor(clip.get_text_features(input_ids=token_ids(tokenizer_2, captions)))
        pooled_1 = text_1(input_ids=token_ids(tokenizer_1, captions)).pooler_output
        loss_2 = contrastive_loss(image, text_2, clip.logit_scale)
        loss_1 = contrastive_loss(image, head_1(pooled_1), scale_1)
        loss = loss_1 + loss_2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == recipe.steps - 1:
            rows.append({"part": "text_encoders", "step": step, "loss_text_encoder": round(loss_1.item(), 6),
                         "loss_text_encoder_2": round(loss_2.item(), 6)})
            log.info("text encoders step %d/%d loss %.4f / %.4f", step, recipe.steps, loss_1.item(), loss_2.item())
    text_2_model = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(TEXT_ENCODER_2, tokenizer_2)))
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    text_2_model.load_state_dict(state)
    return text_1.eval(), text_2_model.eval(), rows


@torch.no_grad()
def zero_shot_accuracy(model, processor, images: list, captions: list[str]) -> float:
    """Share of images whose most similar world caption (among all 168) is their own."""
    every = [c.caption for c in all_combinations()]
    text = F.normalize(_tensor(model.get_text_features(input_ids=token_ids(processor.tokenizer, every))), dim=-1)
    pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
    image = F.normalize(_tensor(model.get_image_features(pixel_values=pixels)), dim=-1)
    chosen = (image @ text.T).argmax(dim=1).tolist()
    return float(np.mean([every[i] == c for i, c in zip(chosen, captions)]))


@torch.no_grad()
def caption_spread(text_1, text_2, tokenizer_1, tokenizer_2) -> dict[str, float]:
    """Per-dimension standard deviation, across all world captions, of what the UNet is conditioned on.

    `sequence`: the penultimate hidden states of both encoders concatenated (SDXL's prompt_embeds);
    `pooled`: text_encoder_2's projected pooled output.
    """
    captions = [c.caption for c in all_combinations()]
    out_1 = text_1(token_ids(tokenizer_1, captions), output_hidden_states=True)
    out_2 = text_2(token_ids(tokenizer_2, captions), output_hidden_states=True)
    sequence = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return {"sequence": float(sequence.std(dim=0).mean()), "pooled": float(out_2.text_embeds.std(dim=0).mean())}
