"""Cross-field checks of issue 23's knobs (loss types, timestep distributions, adapters, fused optimizer): bad
combinations stop the run before any model loads, naming the options, where they came from and the fix."""

from __future__ import annotations

from typing import Any, Mapping

from expertune.errors import ConfigError

# Optimizers whose update of a parameter reads only that parameter's gradient and state (train/fused.py).
PER_PARAMETER_OPTIMIZERS = ("adamw", "adamw_bf16", "adafactor")


def check_knobs(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    def src(name: str) -> str:
        return sources.get(name, "defaults")

    if values["timestep_bias_strategy"] == "range" and not values["timestep_bias_begin"] < values["timestep_bias_end"]:
        raise ConfigError(
            f"timestep_bias_strategy=range (from {src('timestep_bias_strategy')}) biases the timesteps "
            f"[timestep_bias_begin, timestep_bias_end) = [{values['timestep_bias_begin']}, "
            f"{values['timestep_bias_end']}), which is empty: give a begin below the end (e.g. 0 and 250)")

    check_adapters(values, sources)
    check_release_gradients(values, sources)
    from expertune.models.quantize import precision_problem

    problem = precision_problem(values["base_model_precision"], values["model_type"])
    if problem is not None:
        raise ConfigError(f"{problem} (base_model_precision from {src('base_model_precision')})")


def check_adapters(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """DoRA and LyCORIS adapters need model_type=lora; a LyCORIS file is read and checked now."""
    def src(name: str) -> str:
        return sources.get(name, "defaults")

    full = values["model_type"] != "lora"
    if values["use_dora"] and full:
        raise ConfigError(f"use_dora (from {src('use_dora')}) trains DoRA adapters, but model_type="
                          f"{values['model_type']} (from {src('model_type')}) trains every UNet weight: set "
                          "model_type=lora (MODEL_TYPE=lora), or drop use_dora")
    if values["lora_type"] == "lycoris":
        if full:
            raise ConfigError(f"lora_type=lycoris (from {src('lora_type')}) trains adapters, but model_type="
                              f"{values['model_type']} (from {src('model_type')}) trains every UNet weight: set "
                              "model_type=lora, or lora_type=standard")
        if values["use_dora"]:
            raise ConfigError(f"use_dora (from {src('use_dora')}) is for lora_type=standard; with lora_type=lycoris "
                              "write \"algo\": \"lora\", \"dora_wd\": true in lycoris_config")
        from expertune.models.adapters import adapter_spec_from_values

        adapter_spec_from_values(values)


def check_release_gradients(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """optimizer_release_gradients steps each parameter from its own gradient in backward: refuse what needs every
    gradient first."""
    if not values["optimizer_release_gradients"]:
        return
    where = f"optimizer_release_gradients (from {sources.get('optimizer_release_gradients', 'defaults')})"
    problems = []
    if values["optimizer"] not in PER_PARAMETER_OPTIMIZERS:
        problems.append(f"optimizer={values['optimizer']} (use {', '.join(PER_PARAMETER_OPTIMIZERS)}: they update "
                        "each parameter from its own gradient)")
    if values["gradient_accumulation_steps"] != 1:
        problems.append(f"gradient_accumulation_steps={values['gradient_accumulation_steps']} (set 1: a step per "
                        "micro-batch; raise train_batch_size instead)")
    if values["max_grad_norm"]:
        problems.append(f"max_grad_norm={values['max_grad_norm']} (set 0: the global norm needs every gradient "
                        "before the first step)")
    if values["num_processes"] * values["num_machines"] > 1 or values["accelerate_config"]:
        problems.append("several processes or an accelerate_config (DDP, FSDP and DeepSpeed reduce gradients after "
                        "the hook that steps them; train on one process)")
    if values["mixed_precision"] == "fp16":
        problems.append("mixed_precision=fp16 (its loss scaler unscales the gradients after backward; use bf16)")
    if values["mixture_offload_inactive"]:
        problems.append("mixture_offload_inactive (it moves optimizer states the hooks hold)")
    if problems:
        raise ConfigError(f"{where} cannot run with " + "; ".join(problems))
