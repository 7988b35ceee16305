"""What one settings source contributes (a Layer of Settings), and the one place an option name is resolved:
an expertune option, or a row of SimpleTuner's flag table (alias, ignore, refuse). Every source (flags, TOML, config.json, config.env's TRAINER_EXTRA_ARGS) goes
through `add_option`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expertune.config.schema import FIELDS
from expertune.config.simpletuner_flags import lookup
from expertune.config.validate import coerce_value, parse_bool
from expertune.errors import ConfigError, UnsupportedFeatureError


@dataclass(frozen=True)
class Setting:
    """A typed value for one field and a phrase naming where it came from."""

    name: str
    value: Any
    source: str


@dataclass
class Layer:
    """What one source contributed: settings in order, and warnings."""

    settings: list[Setting] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # logged at info level: ignored values that change nothing
    environment: dict[str, str] = field(default_factory=dict)  # process-environment variables to export


def as_text(raw: Any) -> str:
    """A JSON/TOML value as SimpleTuner's command line would have it (true/false, 500, 1e-4)."""
    if raw is None:
        return ""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)


def is_off(raw: Any) -> bool:
    """Empty or false: an ignored option with this value needs no message."""
    return raw is None or raw is False or (isinstance(raw, str) and raw.strip().lower() in ("", "false"))


def known_names() -> list[str]:
    """Every name an option may have (for "did you mean" suggestions)."""
    from expertune.config.simpletuner_flags import OPTIONS

    return [*FIELDS, *OPTIONS]


def takes_value(name: str) -> bool | None:
    """How a bare `--name` reads on a command line: False for a switch (boolean), True when it needs a value,
    None for a name that may go either way (an ignored or refused SimpleTuner option), KeyError when unknown."""
    spec = FIELDS.get(name)
    if spec is not None:
        return spec.type is not bool
    row = lookup(name)
    if row is not None and row.action == "alias":
        return row.on_value is None and FIELDS[row.target].type is not bool
    if row is not None:
        return None
    raise KeyError(name)


def add_option(layer: Layer, name: str, raw: Any, source: str, label: str | None = None) -> bool:
    """Resolve `name` (without `--`) with its raw value into `layer`; False when no option has that name.

    A SimpleTuner spelling sets its expertune option; an ignored option adds a message (none for an empty /
    false value); a refused one with a value that asks for it raises UnsupportedFeatureError. `label` is how
    messages name the option (`--name`, `key 'name'`); `source` where it came from.
    """
    label = label or name
    spec = FIELDS.get(name)
    if name == "validation_prompt_library" and parse_bool(as_text(raw)) is not None:
        spec = None  # SimpleTuner's switch of the same name (its built-in library), not expertune's file path
    elif spec is not None:
        layer.settings.append(Setting(name, coerce_value(spec, raw, source), source))
        return True
    row = lookup(name)
    if row is None:
        return False
    text = as_text(raw)
    if row.action == "alias":
        target = FIELDS[row.target]
        if row.on_value is not None:
            on = parse_bool(text)
            if on is None:
                raise ConfigError(f"invalid value for {name}: {text!r} (from {source}); expected true or false")
            if on:
                layer.settings.append(Setting(row.target, coerce_value(target, row.on_value, source), source))
            return True
        layer.settings.append(Setting(row.target, coerce_value(target, raw, f"{source}, as {label}"), source))
        return True
    if row.is_quiet(text):
        return True
    if row.action == "refuse":
        raise UnsupportedFeatureError(f"{label} = {text} (from {source}) is not supported: {row.reason}")
    message = f"{label} = {text} (from {source}) ignored: {row.reason}"
    (layer.warnings if row.warn else layer.notes).append(message)
    return True
