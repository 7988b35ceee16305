"""Cross-field checks of issue 23's knobs (loss types, timestep distributions, adapters, fused optimizer): bad
combinations stop the run before any model loads, naming the options, where they came from and the fix."""

from __future__ import annotations

from typing import Any, Mapping

from expertune.errors import ConfigError


def check_knobs(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    def src(name: str) -> str:
        return sources.get(name, "defaults")

    if values["timestep_bias_strategy"] == "range" and not values["timestep_bias_begin"] < values["timestep_bias_end"]:
        raise ConfigError(
            f"timestep_bias_strategy=range (from {src('timestep_bias_strategy')}) biases the timesteps "
            f"[timestep_bias_begin, timestep_bias_end) = [{values['timestep_bias_begin']}, "
            f"{values['timestep_bias_end']}), which is empty: give a begin below the end (e.g. 0 and 250)")

    check_adapters(values, sources)


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
