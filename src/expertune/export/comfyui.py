"""A ComfyUI workflow (API format) that runs a chain of exported experts, one `KSamplerAdvanced` per expert.

API format: `{"<id>": {"class_type": ..., "inputs": {...}}}`; an input that comes from another node is
`["<node id>", output index]`. The chain follows ComfyUI's SDXL base → refiner example: each expert is its own
`CheckpointLoaderSimple` (a LoRA expert: its base checkpoint and a `LoraLoader`), and a v-prediction or
zero-terminal-SNR expert a `ModelSamplingDiscrete` that says so (the LoRA's base checkpoint would otherwise sample
as ε); the first sampler adds the
noise and stops at its boundary step returning the leftover noise, each next one starts at that step with
`add_noise` disabled; the last returns a clean latent, decoded by its own VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from expertune.experts import ExpertBand

# Output slots of the node classes used here (ComfyUI's RETURN_TYPES).
OUTPUTS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"),
    "LoraLoader": ("MODEL", "CLIP"),
    "ModelSamplingDiscrete": ("MODEL",),
    "CLIPTextEncode": ("CONDITIONING",),
    "CLIPTextEncodeSDXLRefiner": ("CONDITIONING",),
    "EmptyLatentImage": ("LATENT",),
    "KSamplerAdvanced": ("LATENT",),
    "VAEDecode": ("IMAGE",),
    "SaveImage": (),
}


@dataclass(frozen=True)
class WorkflowExpert:
    """One expert of the chain as ComfyUI loads it: its checkpoint file name (a LoRA expert: the base model's
    checkpoint name and its LoRA file name), its band, and whether it has the refiner layout."""

    checkpoint: str
    band: ExpertBand
    lora: str | None = None
    refiner: bool = False
    prediction_type: str = "epsilon"  # diffusers' name: epsilon, v_prediction or sample
    zero_terminal_snr: bool = False


def boundary_steps(bands: list[ExpertBand], steps: int) -> list[tuple[int, int]]:
    """(start_at_step, end_at_step) of each expert, in chain order: the band's `denoising_end` fraction of the
    chain's steps, rounded; contiguous from 0 to `steps`."""
    ends = [steps if band.denoising_end is None else round(steps * band.denoising_end) for band in bands]
    ends[-1] = steps
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends))


def chain_workflow(experts: list[WorkflowExpert], *, prompt: str = "a photograph", negative_prompt: str = "",
                   steps: int = 30, cfg: float = 7.0, seed: int = 0, width: int = 1024, height: int = 1024,
                   sampler_name: str = "euler", scheduler: str = "normal") -> dict[str, dict[str, Any]]:
    """The API-format workflow of the chain (experts in chain order: the first denoises from pure noise)."""
    if not experts:
        raise ValueError("a workflow needs at least one expert")
    nodes: dict[str, dict[str, Any]] = {}

    def add(class_type: str, inputs: dict[str, Any]) -> str:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    latent = [add("EmptyLatentImage", {"width": width, "height": height, "batch_size": 1}), 0]
    spans = boundary_steps([e.band for e in experts], steps)
    vae: list[Any] = []
    for index, (expert, (start, end)) in enumerate(zip(experts, spans)):
        loader = add("CheckpointLoaderSimple", {"ckpt_name": expert.checkpoint})
        model, clip, vae = [loader, 0], [loader, 1], [loader, 2]
        if expert.lora is not None:
            lora = add("LoraLoader", {"model": model, "clip": clip, "lora_name": expert.lora,
                                      "strength_model": 1.0, "strength_clip": 1.0})
            model, clip = [lora, 0], [lora, 1]
        if expert.prediction_type != "epsilon" or expert.zero_terminal_snr:  # said explicitly: a LoRA's base is ε
            sampling = {"v_prediction": "v_prediction", "sample": "x0"}.get(expert.prediction_type, "eps")
            model = [add("ModelSamplingDiscrete", {"model": model, "sampling": sampling,
                                                   "zsnr": expert.zero_terminal_snr}), 0]
        if expert.refiner:
            positive = add("CLIPTextEncodeSDXLRefiner", {"ascore": 6.0, "width": width, "height": height,
                                                         "text": prompt, "clip": clip})
            negative = add("CLIPTextEncodeSDXLRefiner", {"ascore": 2.5, "width": width, "height": height,
                                                         "text": negative_prompt, "clip": clip})
        else:
            positive = add("CLIPTextEncode", {"text": prompt, "clip": clip})
            negative = add("CLIPTextEncode", {"text": negative_prompt, "clip": clip})
        last = index == len(experts) - 1
        sampler = add("KSamplerAdvanced", {
            "model": model, "add_noise": "enable" if index == 0 else "disable", "noise_seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "positive": [positive, 0], "negative": [negative, 0], "latent_image": latent,
            "start_at_step": start, "end_at_step": end if not last else 10000,
            "return_with_leftover_noise": "disable" if last else "enable",
        })
        latent = [sampler, 0]
    decoded = add("VAEDecode", {"samples": latent, "vae": vae})
    add("SaveImage", {"images": [decoded, 0], "filename_prefix": "expertune"})
    return nodes
