"""SDXL-layout pipelines built from configs: random weights, offline tokenizers, no downloads.

The layout follows SSD-1B (per-block transformer depths given as lists, an asymmetric decoder, a mid
block without attention) so the code paths that must handle SDXL *and* SSD-1B are exercised by the
same tiny model. Everything is seeded: the same seed writes the same bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from expertune.io_utils import staged_directory
from expertune.models.layouts import REFINER_BLOCKS, PipelineLayout, TextEncoderShape, vae_config

TEXT_ENCODER_1_WIDTH = 16
TEXT_ENCODER_2_WIDTH = 32
POOLED_WIDTH = 32
TIME_EMBED_DIM = 8
MAX_TOKENS = 77


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points from 256 up.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _byte_vocabulary() -> dict[str, int]:
    """CLIP's byte-level symbols, each alone and as a word end, plus the two special tokens."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _write_tokenizer(directory: Path, pad_token: str) -> dict[str, int]:
    """Save a byte-level CLIP tokenizer with no merges: every byte is a token, so any text encodes."""
    from transformers import CLIPTokenizer

    vocabulary = _byte_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocabulary, merges=[], pad_token=pad_token, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(directory))
    return {
        "vocab_size": len(vocabulary),
        "bos_token_id": vocabulary["<|startoftext|>"],
        "eos_token_id": vocabulary["<|endoftext|>"],
        "pad_token_id": tokenizer.pad_token_id,
    }


def _text_encoder_config(shape: TextEncoderShape, token_ids: dict[str, int]):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=shape.vocab_size or token_ids["vocab_size"],
        hidden_size=shape.width,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=shape.hidden_act,
        projection_dim=shape.projection_dim,
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
    )


TINY_TEXT_ENCODER_1 = TextEncoderShape(TEXT_ENCODER_1_WIDTH, 2, 2, 2 * TEXT_ENCODER_1_WIDTH, TEXT_ENCODER_1_WIDTH)
TINY_TEXT_ENCODER_2 = TextEncoderShape(TEXT_ENCODER_2_WIDTH, 2, 2, 2 * TEXT_ENCODER_2_WIDTH, POOLED_WIDTH)


def tiny_unet_config(sample_size: int = 16, *, text_widths: tuple[int, int] = (TEXT_ENCODER_1_WIDTH, TEXT_ENCODER_2_WIDTH),
                     pooled_width: int = POOLED_WIDTH, time_embed_dim: int = TIME_EMBED_DIM) -> dict:
    """An SSD-1B-shaped UNet config at toy width (about 2M parameters), for text encoders of the given widths."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=[[1, 1], [1, 1], [2, 2]],
        reverse_transformer_layers_per_block=[[2, 2, 1], [1, 1, 1], [1, 1, 1]],
        cross_attention_dim=sum(text_widths),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_width + 6 * time_embed_dim,
    )


REFINER_TIME_IDS = 5  # orig_h, orig_w, crop_top, crop_left, aesthetic_score


def tiny_refiner_unet_config(sample_size: int = 16, *, text_width: int = TEXT_ENCODER_2_WIDTH,
                             pooled_width: int = POOLED_WIDTH, time_embed_dim: int = TIME_EMBED_DIM) -> dict:
    """The SDXL refiner's UNet shape at toy width: four blocks, attention in the middle two and in the mid
    block, cross-attention over text encoder 2 only, five time ids."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        **REFINER_BLOCKS,
        block_out_channels=(16, 32, 48, 48),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=(2, 4, 4, 4),
        transformer_layers_per_block=1,
        cross_attention_dim=text_width,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_width + REFINER_TIME_IDS * time_embed_dim,
    )


def tiny_vae_config(sample_size: int = 128) -> dict:
    return vae_config((8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=sample_size,
                      force_upcast=False)


def tiny_scheduler_config() -> dict:
    """SDXL's own noise schedule and sampler defaults."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def tiny_layout() -> PipelineLayout:
    return PipelineLayout(tiny_unet_config(), tiny_vae_config(), TINY_TEXT_ENCODER_1, TINY_TEXT_ENCODER_2)


def tiny_refiner_layout() -> PipelineLayout:
    """The SDXL refiner's layout at toy size: the tiny base's VAE and text encoder 2 shapes, no text encoder 1."""
    return PipelineLayout(tiny_refiner_unet_config(), tiny_vae_config(), None, TINY_TEXT_ENCODER_2)


def build_tiny_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete `StableDiffusionXLPipeline` directory of a tiny SDXL-layout model."""
    return build_random_pipeline(directory, tiny_layout(), seed=seed)


def build_tiny_refiner(directory: str | os.PathLike, seed: int = 0, *, vae_from: str | os.PathLike | None = None,
                       text_encoder_from: str | os.PathLike | None = None) -> Path:
    """Write a `StableDiffusionXLImg2ImgPipeline` directory of a tiny SDXL-refiner-layout model.

    `vae_from` / `text_encoder_from` name a saved pipeline (the tiny base) whose VAE / text encoder 2 and
    tokenizer 2 are copied instead of drawn, as the real refiner ships SDXL's VAE and bigG encoder.
    """
    return build_random_pipeline(directory, tiny_refiner_layout(), seed=seed, vae_from=vae_from,
                                 text_encoder_from=text_encoder_from)


def build_random_pipeline(
    directory: str | os.PathLike, layout: PipelineLayout, *, seed: int = 0, device: str = "cpu",
    vae_from: str | os.PathLike | None = None, text_encoder_from: str | os.PathLike | None = None,
) -> Path:
    """Write a randomly initialised SDXL-layout pipeline of the given layout, offline and seeded.

    A base layout is saved as a `StableDiffusionXLPipeline`, a refiner layout (`text_encoder_1` None) as a
    `StableDiffusionXLImg2ImgPipeline` with `requires_aesthetics_score=True` and no text encoder 1 nor tokenizer.
    `vae_from` / `text_encoder_from` copy the VAE / text encoder 2 and tokenizer 2 of a saved pipeline.
    The directory is assembled under a temporary name beside `directory` and renamed into place.
    `device` only speeds up initialisation of large layouts; the same seed gives the same bytes per device.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from expertune.models.sdxl import sdxl_pipeline

    with staged_directory(directory) as staged, tempfile.TemporaryDirectory() as tokenizers:
        scratch = Path(tokenizers)
        # SDXL pads its first tokenizer with <|endoftext|> and its second with "!": keep that quirk.
        ids_1 = _write_tokenizer(scratch / "tokenizer_1", pad_token="<|endoftext|>")
        ids_2 = _write_tokenizer(scratch / "tokenizer_2", pad_token="!")
        tokenizer_1 = CLIPTokenizer.from_pretrained(str(scratch / "tokenizer_1"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(scratch / "tokenizer_2"))

        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            if device != "cpu":
                torch.cuda.manual_seed_all(seed)
            text_encoder_1 = (None if layout.text_encoder_1 is None
                              else CLIPTextModel(_text_encoder_config(layout.text_encoder_1, ids_1)))
            text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(layout.text_encoder_2, ids_2))
            vae = AutoencoderKL(**layout.vae)
            unet = UNet2DConditionModel(**layout.unet)
        if vae_from is not None:
            vae = AutoencoderKL.from_pretrained(str(vae_from), subfolder="vae", use_safetensors=True)
        if text_encoder_from is not None:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                str(text_encoder_from), subfolder="text_encoder_2", use_safetensors=True)
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(text_encoder_from), subfolder="tokenizer_2")
        scheduler = EulerDiscreteScheduler(**tiny_scheduler_config())

        pipeline = sdxl_pipeline(refiner=layout.is_refiner, vae=vae, text_encoder_1=text_encoder_1,
                                 text_encoder_2=text_encoder_2, tokenizer_1=tokenizer_1, tokenizer_2=tokenizer_2,
                                 unet=unet, scheduler=scheduler)
        pipeline.save_pretrained(str(staged), safe_serialization=True)
    return Path(directory)


TINY_CLIP_IMAGE_SIZE = 32


def build_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random `CLIPModel` with its `CLIPProcessor` (byte-level tokenizer, PIL image processor).

    It loads with `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained` offline and without
    torchvision: a stand-in for real CLIP weights in tests and the demo (its scores mean nothing).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    with staged_directory(directory) as staged, tempfile.TemporaryDirectory() as tokenizers:
        scratch = Path(tokenizers)
        token_ids = _write_tokenizer(scratch / "tokenizer", pad_token="<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(str(scratch / "tokenizer"))
        text = _text_encoder_config(TextEncoderShape(32, 2, 2, 64, 16), token_ids).to_dict()
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, projection_dim=16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
            crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
        )
        model.save_pretrained(str(staged), safe_serialization=True)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(staged))
    return Path(directory)


def small_layout() -> PipelineLayout:
    """The tiny model's layout at benchmark width: a 68M-parameter UNet, tiny text encoders and VAE."""
    unet = tiny_unet_config(sample_size=32)
    unet.update(block_out_channels=(128, 256, 384), attention_head_dim=(4, 8, 12), norm_num_groups=32)
    base = tiny_layout()
    return PipelineLayout(unet, base.vae, base.text_encoder_1, base.text_encoder_2)
