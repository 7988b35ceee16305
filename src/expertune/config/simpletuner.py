"""SimpleTuner config.env variables that set no expertune option: what happens to each, in one table.

The mid-2024 `config/config.env.example` (the file users copy) holds, beside the variables of the option
tables (`schema.FIELDS[...].env`), model-family switches, hub-upload settings, cache-worker knobs and
process-environment variables. Each is listed here with what expertune does with it, so that no variable
of that file is "unknown":

- `refuse`: asking for it (a true value) changes what is trained and expertune cannot do it: the run stops;
- `ignore`: it does not change what is trained; a non-empty, non-false value logs one line with the reason;
- process-environment variables (`is_process_variable`) are exported to the environment of the run, as the
  shell that sourced config.env would have done.

`DEBUG_EXTRA_ARGS` holds flags like `TRAINER_EXTRA_ARGS` (see sources.read_env). Variables that are only
read by other variables' `${...}` expansions (`BASE_DIR`) are helpers and draw no message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The flag variables: split like a shell command line and read as flags, in this order (later wins), after
# the option variables. SimpleTuner's train.sh puts DEBUG_EXTRA_ARGS before TRAINER_EXTRA_ARGS.
FLAG_VARIABLES = ("DEBUG_EXTRA_ARGS", "TRAINER_EXTRA_ARGS")


@dataclass(frozen=True)
class TemplateVariable:
    name: str
    action: Literal["ignore", "refuse"]
    reason: str
    warn: bool = False  # an ignored value the user may count on (a warning, not an info line)
    only_with: str | None = None  # read only when this other variable is on (else silent)


def _family(name: str, family: str) -> TemplateVariable:
    return TemplateVariable(name, "refuse", f"{family} training is not supported; expertune trains SDXL-family "
                                            "UNets (set it to false)")


_ROWS = (
    _family("STABLE_DIFFUSION_3", "Stable Diffusion 3"),
    _family("PIXART_SIGMA", "PixArt Sigma"),
    _family("AURA_FLOW", "AuraFlow"),
    _family("AURA_DIFFUSION", "AuraFlow"),
    _family("STABLE_DIFFUSION_LEGACY", "Stable Diffusion 1.x/2.x"),
    _family("KOLORS", "Kolors"),
    _family("FLUX", "Flux"),
    _family("HUNYUAN_DIT", "Hunyuan DiT"),
    TemplateVariable("CONTROLNET", "refuse", "ControlNet training is not supported (set it to false)"),
    TemplateVariable("FLUX_GUIDANCE_VALUE", "ignore", "a Flux-only setting"),
    TemplateVariable("FLUX_LORA_TARGET", "ignore", "a Flux-only setting"),
    TemplateVariable("VALIDATION_GUIDANCE_REAL", "ignore", "a Flux-only validation setting"),
    TemplateVariable("VALIDATION_NO_CFG_UNTIL_TIMESTEP", "ignore", "a Flux-only validation setting"),
    TemplateVariable("USE_XFORMERS", "ignore", "not needed: diffusers' default attention is PyTorch's "
                                               "scaled_dot_product_attention (SDPA), which already uses "
                                               "memory-efficient / flash kernels where the device has them"),
    # PUSH_TO_HUB, HUB_MODEL_NAME and PUSH_CHECKPOINTS are options now (schema.HubConfig).
    TemplateVariable("MODEL_CARD_SAFE_FOR_WORK", "ignore", "expertune's model cards carry no not-for-all-audiences "
                                                           "tag; add one on the hub if the model needs it"),
    TemplateVariable("METADATA_UPDATE_INTERVAL", "ignore", "expertune writes its bucket metadata once per cache "
                                                           "pass, atomically"),
    TemplateVariable("MAX_WORKERS", "ignore", "cache encoding runs in the training process (batch sizes: "
                                              "VAE_BATCH_SIZE, TEXT_ENCODER_BATCH_SIZE)"),
    TemplateVariable("IMAGE_PROCESSING_BATCH_SIZE", "ignore", "images are resized and cropped as each VAE "
                                                              "batch is encoded (VAE_BATCH_SIZE)"),
    TemplateVariable("AWS_MAX_POOL_CONNECTIONS", "ignore", '`"type": "aws"` datasets size their own connection '
                                                           "pool (docs/storage.md)"),
    TemplateVariable("TORCH_NUM_THREADS", "ignore", "torch does not read it; set OMP_NUM_THREADS to bound CPU "
                                                    "threads"),
    TemplateVariable("DELETE_ERRORED_IMAGES", "ignore", "expertune never deletes images: unreadable ones are "
                                                        "skipped and listed in run.json (skipped_images)", warn=True),
    TemplateVariable("DELETE_SMALL_IMAGES", "ignore", "expertune never deletes images: small ones are skipped "
                                                      "and listed in run.json (skipped_images)", warn=True),
    TemplateVariable("INSTANCE_PROMPT", "ignore", "set instance_prompt with caption_strategy=instanceprompt in "
                                                  "the dataloader JSON instead", warn=True),
)

TEMPLATE_VARIABLES: dict[str, TemplateVariable] = {row.name: row for row in _ROWS}

# Read by the libraries and tools a run uses, never by expertune's option tables.
PROCESS_VARIABLES = frozenset({"TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                               "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "SAFETENSORS_FAST_GPU"})
PROCESS_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "ACCELERATE_LOG", "WANDB_", "CUDA_",
                    "NCCL_", "PYTORCH_", "TORCHINDUCTOR_", "TORCH_CUDA", "TRITON_", "XDG_")


def is_process_variable(name: str) -> bool:
    """True for variables the shell would export for the libraries (TOKENIZERS_PARALLELISM, HF_HOME, ...)."""
    return name in PROCESS_VARIABLES or name.startswith(PROCESS_PREFIXES)


def is_off(value: str) -> bool:
    """Empty, false or 0: SimpleTuner's train.sh acts on none of these."""
    return value.strip().lower() in ("", "false", "0", "no", "off")
