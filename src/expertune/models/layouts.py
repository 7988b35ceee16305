"""Full-size SDXL-family layouts (REFERENCE §3), for building random-weight stand-ins of real models.

Used by benchmarks to check that the trainer handles the real model sizes without downloading them.
"""

from __future__ import annotations

from expertune.models.tiny import PipelineLayout, TextEncoderShape, tiny_layout, tiny_unet_config, vae_config

CLIP_L = TextEncoderShape(width=768, layers=12, heads=12, intermediate=3072, projection_dim=768,
                          hidden_act="quick_gelu", vocab_size=49408)
OPEN_CLIP_BIGG = TextEncoderShape(width=1280, layers=32, heads=20, intermediate=5120, projection_dim=1280,
                                  hidden_act="gelu", vocab_size=49408)


def sdxl_unet_config() -> dict:
    """The SDXL base UNet (2.6B parameters)."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def ssd1b_unet_config() -> dict:
    """segmind SSD-1B: the SDXL UNet with shorter low-resolution transformer stacks, no mid attention."""
    config = sdxl_unet_config()
    config.update(
        transformer_layers_per_block=[[1, 1], [2, 2], [4, 4]],
        reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
        mid_block_type="UNetMidBlock2D",
    )
    return config


def sdxl_vae_config() -> dict:
    return vae_config((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024,
                      force_upcast=True)


def ssd1b_layout() -> PipelineLayout:
    return PipelineLayout(ssd1b_unet_config(), sdxl_vae_config(), CLIP_L, OPEN_CLIP_BIGG)


def sdxl_layout() -> PipelineLayout:
    return PipelineLayout(sdxl_unet_config(), sdxl_vae_config(), CLIP_L, OPEN_CLIP_BIGG)


def small_layout() -> PipelineLayout:
    """The tiny model's layout at benchmark width: a 68M-parameter UNet, tiny text encoders and VAE."""
    unet = tiny_unet_config(sample_size=32)
    unet.update(block_out_channels=(128, 256, 384), attention_head_dim=(4, 8, 12), norm_num_groups=32)
    base = tiny_layout()
    return PipelineLayout(unet, base.vae, base.text_encoder_1, base.text_encoder_2)
