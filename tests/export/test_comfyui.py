"""The ComfyUI chain workflow, checked against the API format's documented structure."""

from __future__ import annotations

import json

import pytest

from expertune.experts import ExpertBand
from expertune.export.comfyui import OUTPUTS, WorkflowExpert, boundary_steps, chain_workflow

# The inputs each node class takes (ComfyUI's INPUT_TYPES of these nodes).
INPUTS = {
    "CheckpointLoaderSimple": {"ckpt_name"},
    "LoraLoader": {"model", "clip", "lora_name", "strength_model", "strength_clip"},
    "ModelSamplingDiscrete": {"model", "sampling", "zsnr"},
    "CLIPTextEncode": {"text", "clip"},
    "CLIPTextEncodeSDXLRefiner": {"ascore", "width", "height", "text", "clip"},
    "EmptyLatentImage": {"width", "height", "batch_size"},
    "KSamplerAdvanced": {"model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                         "negative", "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise"},
    "VAEDecode": {"samples", "vae"},
    "SaveImage": {"images", "filename_prefix"},
}
LINK_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING", "negative": "CONDITIONING",
              "latent_image": "LATENT", "samples": "LATENT", "images": "IMAGE"}


def three_experts() -> list[WorkflowExpert]:
    n = 1000
    return [WorkflowExpert("e0.safetensors", ExpertBand(700, 999, n)),
            WorkflowExpert("sdxl_base.safetensors", ExpertBand(300, 699, n), lora="e1_lora.safetensors",
                           prediction_type="v_prediction", zero_terminal_snr=True),
            WorkflowExpert("e2.safetensors", ExpertBand(0, 299, n), refiner=True)]


def check_structure(workflow: dict) -> None:
    """Every node has a known class and exactly its inputs; every link names an existing node's output slot of
    the type the input takes."""
    json.dumps(workflow)
    for node_id, node in workflow.items():
        assert set(node) == {"class_type", "inputs"}, node_id
        assert set(node["inputs"]) == INPUTS[node["class_type"]], node_id
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source, slot = value
                assert isinstance(source, str) and source in workflow, (node_id, name)
                outputs = OUTPUTS[workflow[source]["class_type"]]
                assert 0 <= slot < len(outputs) and outputs[slot] == LINK_TYPES[name], (node_id, name)


def test_chain_workflow_links_and_step_handover() -> None:
    workflow = chain_workflow(three_experts(), steps=20, seed=5)
    check_structure(workflow)
    samplers = [(k, n["inputs"]) for k, n in workflow.items() if n["class_type"] == "KSamplerAdvanced"]
    assert len(samplers) == 3
    spans = [(s["start_at_step"], s["end_at_step"]) for _, s in samplers]
    assert spans == [(0, 6), (6, 14), (14, 10000)]  # the bands' denoising_end: 0.3 and 0.7 of 20 steps
    assert [s["add_noise"] for _, s in samplers] == ["enable", "disable", "disable"]
    assert [s["return_with_leftover_noise"] for _, s in samplers] == ["enable", "enable", "disable"]
    assert all(s["steps"] == 20 and s["noise_seed"] == 5 for _, s in samplers)
    # each sampler continues the previous one's latent, the first an empty latent
    assert workflow[samplers[0][1]["latent_image"][0]]["class_type"] == "EmptyLatentImage"
    assert [s["latent_image"][0] for _, s in samplers[1:]] == [k for k, _ in samplers[:-1]]
    # each expert samples with its own model: its checkpoint, or its LoRA over its base
    models = [workflow[s["model"][0]] for _, s in samplers]
    assert models[0]["inputs"]["ckpt_name"] == "e0.safetensors"
    assert models[1]["class_type"] == "ModelSamplingDiscrete"  # the v-prediction LoRA says how it samples
    assert (models[1]["inputs"]["sampling"], models[1]["inputs"]["zsnr"]) == ("v_prediction", True)
    lora = workflow[models[1]["inputs"]["model"][0]]
    assert lora["class_type"] == "LoraLoader" and lora["inputs"]["lora_name"] == "e1_lora.safetensors"
    assert workflow[samplers[2][1]["positive"][0]]["class_type"] == "CLIPTextEncodeSDXLRefiner"
    decode = next(n for n in workflow.values() if n["class_type"] == "VAEDecode")
    assert decode["inputs"]["samples"] == [samplers[-1][0], 0]
    assert workflow[decode["inputs"]["vae"][0]]["inputs"]["ckpt_name"] == "e2.safetensors"


def test_one_expert_samples_the_whole_schedule() -> None:
    workflow = chain_workflow([WorkflowExpert("only.safetensors", ExpertBand.full(1000))], steps=25)
    check_structure(workflow)
    (sampler,) = [n["inputs"] for n in workflow.values() if n["class_type"] == "KSamplerAdvanced"]
    assert (sampler["add_noise"], sampler["start_at_step"], sampler["return_with_leftover_noise"]) == \
        ("enable", 0, "disable")


@pytest.mark.parametrize("steps", [1, 7, 30, 50])
def test_boundary_steps_are_contiguous(steps: int) -> None:
    spans = boundary_steps([e.band for e in three_experts()], steps)
    assert spans[0][0] == 0 and spans[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_a_workflow_needs_an_expert() -> None:
    with pytest.raises(ValueError):
        chain_workflow([])
