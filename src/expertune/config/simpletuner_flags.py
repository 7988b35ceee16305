"""SimpleTuner's command-line options that are not expertune option names: what happens to each, in one table.

SimpleTuner's flags reach expertune through config.json / config.toml keys (with or without `--`), the flags
of config.env's TRAINER_EXTRA_ARGS, a TOML file or the command line. An option whose name is an expertune
option (`schema.FIELDS`) simply works. Every other SimpleTuner option that a config for SDXL-family UNet
training may hold is a row here (`OPTIONS`) or belongs to a family of rows (`FAMILIES`, by name prefix):

- `alias`: the same setting under expertune's name (`checkpointing_steps` -> `checkpoint_step_interval`);
  a boolean alias with `on_value` sets its target to that value when true (`ema_cpu_only` -> `ema_device=cpu`);
- `ignore`: it does not change what is trained (or expertune does the equivalent on its own): a value that is
  not empty / false / its `quiet` values logs one line with the reason (a warning where `warn`);
- `refuse`: a value other than its `quiet` ones (off, empty) asks for training expertune cannot do: the run
  stops with exit code 2, naming the option, the value, where it came from and the reason.

docs/from-simpletuner.md and docs/configuration.md are generated from these rows (config/reference.py).
Options not yet built (lora_format, ...) are `ignore` rows until they become expertune options of the same
name; a row whose name becomes a field must leave the table (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OFF = ("", "false", "0", "no", "off", "none", "null")


@dataclass(frozen=True)
class SimpleTunerOption:
    name: str
    action: Literal["alias", "ignore", "refuse"]
    reason: str = ""  # ignore / refuse: one line, what expertune does instead
    target: str = ""  # alias: the expertune option
    on_value: str | None = None  # alias of a boolean: the target's value when true (false sets nothing)
    warn: bool = False  # ignore: a warning (the user may count on it) rather than an info line
    quiet: tuple[str, ...] = OFF  # values that draw no message and are never refused
    env: str = ""  # its config.env variable, when SimpleTuner's config.env has one

    def is_quiet(self, value: str) -> bool:
        return value.strip().lower() in self.quiet


def _alias(name: str, target: str, on_value: str | None = None) -> SimpleTunerOption:
    return SimpleTunerOption(name, "alias", target=target, on_value=on_value)


def _ignore(names: str, reason: str, warn: bool = False) -> list[SimpleTunerOption]:
    return [SimpleTunerOption(n, "ignore", reason, warn=warn) for n in names.split()]


def _refuse(name: str, reason: str, quiet: tuple[str, ...] = OFF) -> SimpleTunerOption:
    return SimpleTunerOption(name, "refuse", reason, quiet=quiet)


_NO_DELETE = "expertune never deletes files: unusable images are skipped and listed in run.json (skipped_images)"
_LOADER = "set it per dataset in the dataloader JSON (data_backend_config)"
_HUB = "a hub-publishing detail expertune does not use: push_to_hub / hub_model_id upload the experts with expertune's own model cards"
_EXPORT = "expertune names its formats --export_format: add single_file for the kohya / ComfyUI LoRA layout (and the original single-file checkpoint of full experts)"
_OFFLOAD = "no block, group or RAM offload: use gradient_checkpointing, optimizer=adamw8bit/adafactor or " \
           "mixture_offload_inactive (docs/memory.md)"
_EVAL = "the held-out per-band loss is computed at each validation (eval_dataset_id / eval_holdout_fraction)"
_VALIDATE = "expertune validates every validation_step_interval steps (and at step 0 with validation_on_startup)"

_ROWS: list[SimpleTunerOption] = [
    # ---- same setting, SimpleTuner's other spelling
    _alias("checkpointing_steps", "checkpoint_step_interval"),
    _alias("validation_steps", "validation_step_interval"),
    _alias("user_prompt_library", "validation_prompt_library"),
    _alias("optimizer_beta1", "adam_beta1"),
    _alias("optimizer_beta2", "adam_beta2"),
    _alias("ema_cpu_only", "ema_device", on_value="cpu"),
    _alias("use_8bit_adam", "optimizer", on_value="adamw8bit"),
    _alias("adam_bfloat16", "optimizer", on_value="adamw_bf16"),
    _alias("use_adafactor_optimizer", "optimizer", on_value="adafactor"),
    _alias("use_prodigy_optimizer", "optimizer", on_value="prodigy"),
    # ---- no effect on what is trained
    *_ignore("validation_torch_compile validation_torch_compile_mode",
             "validation runs the UNet eagerly; torch.compile applies to training only (dynamo_backend)"),
    *_ignore("disable_benchmark", "expertune measures no benchmark run before training"),
    *_ignore("seed_for_each_device", "one generator draws each global batch's randomness and every process takes "
                                     "its slice (the same run on 1 or N processes)"),
    *_ignore("num_validation_images", "one image per validation prompt and resolution"),
    *_ignore("validation_image_format validation_image_quality tracker_image_layout validation_preview "
             "validation_preview_steps validation_stitch_input_location",
             "validation images are PNG files and TensorBoard/W&B images"),
    *_ignore("validation_noise_scheduler validation_randomize validation_seed_source",
             "validation samples with the model's own scheduler (inference_scheduler_timestep_spacing) and a fixed "
             "seed (validation_seed)", warn=True),
    *_ignore("validation_disable_unconditional validation_guidance_skip_layers validation_guidance_skip_layers_start "
             "validation_guidance_skip_layers_stop validation_guidance_skip_scale validation_external_script "
             "validation_external_background validation_lycoris_strength validation_adapter_path "
             "validation_adapter_name validation_adapter_strength validation_adapter_mode validation_adapter_config "
             "ema_validation", "a validation variant expertune does not make"),
    *[SimpleTunerOption(name, "ignore", _VALIDATE, warn=True, env=name.upper())
      for name in ("validation_epoch_interval", "validate_after_step", "validate_after_epoch", "validation_method")],
    SimpleTunerOption("sdxl_validation_pipeline_mode", "ignore", "the chain of experts is validated with "
                      "validation_peer_expert (or in a mixture job)", warn=True, env="SDXL_VALIDATION_PIPELINE_MODE"),
    *_ignore("sdxl_validation_stage1_model sdxl_validation_stage2_model",
             "the chain of experts is validated with validation_peer_expert (or in a mixture job)"),
    *_ignore("eval_steps_interval eval_epoch_interval num_eval_images eval_dataset_pooling eval_timesteps "
             "eval_loss_disable", _EVAL),
    *_ignore("push_to_hub_background model_card_note "
             "model_card_private model_card_safe_for_work modelspec_comment publishing_config", _HUB, warn=True),
    *_ignore("lora_format", _EXPORT, warn=True),
    *_ignore("webhook_config webhook_reporting_interval post_checkpoint_script post_upload_script kubeflow",
             "expertune calls no hooks: it logs lines, metrics.jsonl and TensorBoard/W&B"),
    *_ignore("checkpointing_use_tempdir", "checkpoints are always written under a temporary name and renamed"),
    *_ignore("checkpointing_rolling_steps checkpoints_rolling_total_limit",
             "one series of checkpoints (checkpoint_step_interval, checkpoints_total_limit)", warn=True),
    *_ignore("delete_invalid_checkpoints", "incomplete checkpoints are skipped and removed when a run starts"),
    *_ignore("delete_problematic_images delete_unwanted_images delete_nsfw_images", _NO_DELETE, warn=True),
    *_ignore("enable_nsfw_check nsfw_check_models nsfw_check_min_votes nsfw_check_backend_types "
             "nsfw_check_sample_types nsfw_check_video_frame_count nsfw_check_video_frame_selection "
             "nsfw_check_video_min_flagged_frames", "expertune runs no NSFW classifier on the data", warn=True),
    *_ignore("disk_low_threshold disk_low_action disk_low_script",
             "a full disk stops the run with exit code 3, leaving no partial file"),
    *_ignore("aspect_bucket_worker_count aspect_bucket_disable_rebuild image_processing_batch_size max_workers "
             "metadata_update_interval aws_max_pool_connections compress_disk_cache dataloader_prefetch "
             "dataloader_prefetch_qlen preserve_data_backend_cache skip_file_discovery vae_cache_scan_behaviour "
             "enable_multiprocessing ignore_missing_files debug_aspect_buckets debug_dataset_loader print_filenames "
             "print_sampler_statistics", "expertune's cache and data loading need no tuning knob here"),
    *_ignore("keep_vae_loaded fully_unload_text_encoder delete_model_after_load offload_during_startup "
             "offload_during_save text_embed_full_cache",
             "the caches are complete before training and the VAE and text encoders are released"),
    *_ignore("accelerator_cache_clear_interval set_grads_to_none local_rank multi_gpu i_know_what_i_am_doing "
             "torch_num_threads", "not needed by expertune's loop (processes come from num_processes)"),
    *_ignore("enable_xformers_memory_efficient_attention attention_mechanism sageattention_usage "
             "fuse_qkv_projections unet_attention_slice",
             "attention is PyTorch's scaled_dot_product_attention (memory-efficient / flash kernels where the "
             "device has them)"),
    *_ignore("vae_enable_slicing vae_enable_tiling vae_enable_patch_conv vae_dtype",
             "the VAE encodes in float32 where its config sets force_upcast (batch size: vae_batch_size)"),
    *_ignore("pretrained_vae_model_name_or_path", "latents are encoded with the model's own VAE: put the VAE you "
                                                  "want in the model folder's vae/", warn=True),
    *_ignore("dynamo_mode dynamo_fullgraph dynamo_use_regional_compilation",
             "torch.compile runs with its defaults (dynamo_backend)"),
    *_ignore("enable_group_offload group_offload_type group_offload_blocks_per_group group_offload_use_stream "
             "group_offload_to_disk_path musubi_blocks_to_swap musubi_block_swap_device ramtorch "
             "ramtorch_target_modules ramtorch_text_encoder ramtorch_vae ramtorch_controlnet "
             "ramtorch_transformer_percent ramtorch_text_encoder_percent ramtorch_disable_sync_hooks "
             "ramtorch_disable_extensions enable_model_cpu_offload optimizer_cpu_offload_method "
             "optimizer_offload_gradients offload_param_path", _OFFLOAD, warn=True),
    *_ignore("gradient_checkpointing_interval gradient_checkpointing_backend gradient_checkpointing_segment_stride "
             "gradient_checkpointing_offload_attention gradient_checkpointing_offload_pin_memory_max_buckets "
             "gradient_checkpointing_offload_prefetch", "gradient_checkpointing recomputes every ResNet and "
             "transformer block (diffusers'), keeping nothing off the GPU", warn=True),
    *_ignore("grad_clip_method gradient_precision",
             "gradients are float32 (bf16 with optimizer=adamw_bf16) and clipped by norm (max_grad_norm)"),
    *_ignore("fuse_optimizer", "SimpleTuner's fused kernels of CPU-offloaded optimizers; the optimizer step in "
                               "backward is optimizer_release_gradients"),
    *_ignore("quantize_via quantization_config quantize_activations base_model_default_dtype "
             "text_encoder_1_precision text_encoder_2_precision",
             "the frozen encoders run once, for the caches; the UNet precision is mixed_precision"),
    *_ignore("model_flavour", "expertune reads the architecture from the model's own config"),
    *_ignore("caption_strategy instance_prompt only_instance_prompt prepend_instance_prompt parquet_caption_column "
             "parquet_filename_column maximum_image_size target_downsample_size max_upscale_threshold "
             "aspect_bucket_alignment cache_dir_text cache_dir_vae crop crop_style crop_aspect", _LOADER, warn=True),
    *_ignore("data_backend_sampling allow_dataset_oversubscription strict_epoch_limit override_dataset_config",
             "datasets are drawn by their repeats and probability in the dataloader JSON; an epoch ends at the end "
             "of the data"),
    *_ignore("ema_foreach_disable ema_warmup_steps",
             "the EMA is diffusers' EMAModel, warmed up as (1 + n) / (10 + n) up to ema_decay"),
    *_ignore("disable_tf32", "TF32 is off unless allow_tf32 is set"),
    *_ignore("enable_watermark", "expertune's validation images carry no watermark"),
    *_ignore("text_encoder_limit", "the text encoders are not trained"),
    *_ignore("conditioning_multidataset_sampling", "conditioning datasets are not read (no ControlNet training)"),
    _refuse("vae_cache_ondemand", "expertune always pre-computes and caches the VAE latents; remove it"),
    _refuse("vae_cache_disable", "expertune always pre-computes and caches the VAE latents; remove it"),
    _refuse("control", "channel-wise control training is not supported"),
    *_ignore("disable_bucket_pruning", "buckets are never pruned"),
    *_ignore("disable_segmented_timestep_sampling", "timesteps are drawn inside the expert's band (timestep_sampling "
                                                    "uniform or stratified)"),
    *_ignore("soft_min_snr_sigma_data", "read only with use_soft_min_snr, which is refused"),
    *_ignore("init_lokr_norm", "LoKr adapters start as peft initialises them (lokr_w2 zero)", warn=True),
    *_ignore("prodigy_steps optimizer_config", "the optimizer's own defaults are used beside the adam_* options",
             warn=True),
    *_ignore("validation_prompt_library", "SimpleTuner's built-in prompt library is not shipped: give your prompts "
                                          "with user_prompt_library FILE"),  # shadowed by the field for a path
    *_ignore("sdxl_refiner_uses_full_range", "set refiner_training / timestep_range for the band you want", warn=True),
    # ---- training expertune cannot do
    _refuse("use_soft_min_snr", "use snr_gamma (min-SNR) or loss_weighting debiased"),
    _refuse("snr_weight", "use snr_gamma (min-SNR) or loss_weighting"),
    _refuse("train_text_encoder", "expertune trains the UNet only; the text embeddings are cached"),
    _refuse("text_encoder_lr", "expertune trains the UNet only; the text embeddings are cached"),
    *[_refuse(n, "expertune trains the UNet only; the text embeddings are cached")
      for n in ("freeze_encoder", "freeze_encoder_before", "freeze_encoder_after", "freeze_encoder_strategy",
                "save_text_encoder")],
    _refuse("lr_scale", "give the learning rate you want (learning_rate); it is not scaled by batch size"),
    _refuse("lr_scale_sqrt", "give the learning rate you want (learning_rate); it is not scaled by batch size"),
    _refuse("trust_remote_code", "expertune never runs a model repository's code"),
    _refuse("pretrained_unet_model_name_or_path", "give a whole model folder (pretrained_model_name_or_path) or a "
                                                  "starting model per expert (expert_models)"),
    _refuse("pretrained_unet_subfolder", "the UNet is read from the model folder's unet/"),
    _refuse("controlnet", "ControlNet training is not supported"),
    _refuse("controlnet_model_name_or_path", "ControlNet training is not supported"),
    _refuse("controlnet_custom_config", "ControlNet training is not supported"),
    _refuse("tread_config", "TREAD token routing is not supported"),
    _refuse("distillation_method", "distillation is not supported"),
    _refuse("distillation_config", "distillation is not supported"),
    _refuse("diffusion_blocks_config", "per-block training settings are not supported"),
    _refuse("sla_config", "sparse linear attention is not supported"),
    _refuse("lora_init_type", "LoRA adapters start as peft's default", quiet=(*OFF, "default")),
    _refuse("init_lora", "a LoRA run starts from fresh adapters (resume_from_checkpoint continues a run)"),
    *_ignore("init_lora_step init_lora_ema", "read only with init_lora, which is refused"),
    _refuse("peft_lora_mode", "standard LoRA only", quiet=(*OFF, "standard")),
    *_ignore("peft_lora_target_modules slider_lora_target singlora_ramp_up_steps",
             "LoRA targets are lora_target_modules (comma-separated module names)", warn=True),
    _refuse("scheduled_sampling_max_step_offset", "scheduled sampling is not supported; leave it at 0",
            quiet=(*OFF, "0.0")),
    _refuse("scheduled_sampling_probability", "scheduled sampling is not supported; leave it at 0",
            quiet=(*OFF, "0.0")),
    *[_refuse(f"{n}_enabled", f"{label} is not supported") for n, label in (
        ("crepa", "CREPA"), ("urepa", "U-REPA"), ("irepa", "iREPA"), ("xm", "cross-model training"),
        ("nextlat", "next-latent prediction"), ("layersync", "LayerSync"), ("mixflow", "MixFlow"),
        ("diff2flow", "Diff2Flow"), ("internal_guidance", "internal guidance"))],
]

OPTIONS: dict[str, SimpleTunerOption] = {row.name: row for row in _ROWS}
assert len(OPTIONS) == len(_ROWS), "an option listed twice"
# Ignored options that SimpleTuner's config.env also sets through a variable: flag name -> variable.
ENV_NAMES: dict[str, str] = {row.name: row.env for row in _ROWS if row.env}


@dataclass(frozen=True)
class SimpleTunerFamily:
    """Options named `prefix...` not listed in OPTIONS: all ignored with one reason."""

    prefix: str
    reason: str


_OTHER_MODEL = "applies to {} models, not SDXL-family UNets"
FAMILIES: tuple[SimpleTunerFamily, ...] = (
    *(SimpleTunerFamily(prefix, _OTHER_MODEL.format(family)) for prefix, family in (
        ("flux_", "Flux"), ("sd3_", "Stable Diffusion 3"), ("pixart_", "PixArt"), ("deepfloyd_", "DeepFloyd"),
        ("ltx_", "LTX Video"), ("ltx2_", "LTX-2"), ("wan_", "Wan"), ("minimax_", "MiniMax"), ("cosmos3_", "Cosmos"),
        ("sana_", "Sana"), ("hidream_", "HiDream"), ("krea2_", "Krea"), ("flow_", "flow-matching"),
        ("audio_", "audio"), ("t5_", "T5-encoder"), ("pretrained_t5", "T5-encoder"),
        ("pretrained_transformer", "transformer (DiT)"), ("pretrained_gemma", "Gemma-encoder"),
        ("qwen_", "Qwen"), ("pretrained_grounding", "grounding"), ("max_grounding", "grounding"),
        ("custom_text_encoder", "custom text-encoder"), ("text_encoder_3", "three-encoder"),
        ("text_encoder_4", "four-encoder"), ("framerate", "video"), ("validation_num_video_frames", "video"),
        ("validation_audio_only", "audio"), ("validation_guidance_real", "Flux"),
        ("validation_no_cfg_until_timestep", "Flux"), ("tokenizer_max_length", "T5-encoder"),
        ("sdnq_", "SDNQ-quantised"))),
    *(SimpleTunerFamily(f"{name}_", f"read only with {name}_enabled, which is refused")
      for name in ("crepa", "urepa", "irepa", "xm", "nextlat", "layersync", "mixflow", "diff2flow",
                   "internal_guidance")),
    SimpleTunerFamily("scheduled_sampling_", "read only with scheduled sampling, which is refused"),
    SimpleTunerFamily("validation_internal_guidance", "read only with internal_guidance_enabled, which is refused"),
)


def lookup(name: str) -> SimpleTunerOption | None:
    """The row of a SimpleTuner option that is not an expertune option name (None: not SimpleTuner's)."""
    row = OPTIONS.get(name)
    if row is not None:
        return row
    for family in FAMILIES:
        if name.startswith(family.prefix):
            return SimpleTunerOption(name, "ignore", family.reason)
    return None
