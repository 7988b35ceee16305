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
