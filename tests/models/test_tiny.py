from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from expertune.models.tiny import build_tiny_pipeline


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    assert _tree_digest(again) == _tree_digest(tiny_model_dir)
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert _tree_digest(other)[unet_file] != _tree_digest(tiny_model_dir)[unet_file]


def test_tiny_model_has_sdxl_layout_and_loads_offline(tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir), use_safetensors=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert all(isinstance(depths, list) for depths in unet.transformer_layers_per_block)
    assert unet.reverse_transformer_layers_per_block is not None
    width_1 = pipe.text_encoder.config.hidden_size
    width_2 = pipe.text_encoder_2.config.hidden_size
    assert width_1 + width_2 == unet.cross_attention_dim
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    pooled = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == pooled + 6 * unet.addition_time_embed_dim
    # The tokenizers were built offline and really tokenise: distinct texts give distinct ids.
    ids = pipe.tokenizer(["a red cube", "a blue ball"], padding="max_length", max_length=77).input_ids
    assert ids[0] != ids[1]
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 77
    # The eos id must be the real one, or CLIP falls back to its legacy argmax pooling.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id

    image = pipe(
        "a red cube",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)
