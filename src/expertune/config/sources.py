"""Where settings come from: a flat TOML file, a config.env file and command-line flags.

Precedence, lowest first: defaults < TOML (``--config FILE``) < config.env (``--env FILE``) <
command-line flags. Inside config.env, the flags in ``TRAINER_EXTRA_ARGS`` win over the other
variables (SimpleTuner appends them last). Within one source the last occurrence wins.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Mapping

from expertune.config.config_files import config_kind, find_default_config, read_config_file
from expertune.config.envfile import final_assignments, read_env_document
from expertune.config.layers import Layer, Setting, add_option, is_off as _is_off, known_names, takes_value
from expertune.config.schema import FIELDS, IGNORED_OPTIONS, SECTIONS, Config, FieldSpec
from expertune.config.simpletuner_flags import OPTIONS
from expertune.config.simpletuner import FLAG_VARIABLES, TEMPLATE_VARIABLES, is_off, is_process_variable
from expertune.config.validate import coerce_value, parse_bool, suggest, validate_values
from expertune.errors import ConfigError, UnsupportedFeatureError
from expertune.redaction import shown_value

log = logging.getLogger(__name__)

EXTRA_ARGS_VAR = "TRAINER_EXTRA_ARGS"
FILE_OPTIONS = ("config", "env")

# config.env variable -> the field it sets (from the `env` metadata of each field).
ENV_FIELDS: dict[str, FieldSpec] = {env: spec for spec in FIELDS.values() for env in spec.env}
# config.env variable -> ignored flag name.
ENV_IGNORED: dict[str, str] = {env: flag for flag, env in IGNORED_OPTIONS.items()}


def parse_flags(argv: list[str], source: str = "command line", *,
                allow_files: bool = False) -> tuple[Layer, dict[str, str]]:
    """Parse ``--flag=value``, ``--flag value`` and bare boolean ``--flag`` tokens (SimpleTuner's spellings
    included: config.simpletuner_flags).

    Returns the layer and, when ``allow_files``, the ``--config`` / ``--env`` paths found.
    """
    layer = Layer()
    files: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r} (from {source}); options look like --name=value")
        name, has_eq, value = token[2:].partition("=")
        nxt = argv[i] if i < len(argv) else None
        # The next token when it can be this option's value (`--name value`).
        following = nxt if not has_eq and nxt is not None and not nxt.startswith("--") else None
        try:
            needs_value: bool | None = True if name in FILE_OPTIONS else takes_value(name)
        except KeyError:
            known = [*known_names(), *(FILE_OPTIONS if allow_files else ())]
            raise ConfigError(f"unknown option --{name} (from {source})" + suggest(name, known)) from None
        if needs_value is False:  # a switch: `--flag`, `--flag=false`, `--flag false`
            if not has_eq and nxt is not None and parse_bool(nxt) is not None:
                value, i = nxt, i + 1
            elif not has_eq:
                value = "true"
        elif following is not None:
            value, i = following, i + 1
        elif not has_eq:
            if needs_value:
                raise ConfigError(f"option --{name} (from {source}) needs a value: --{name}=VALUE")
            value = "true"  # an ignored / refused SimpleTuner option given as a bare switch
        if name in FILE_OPTIONS:
            if not allow_files:
                raise ConfigError(f"--{name} is only accepted on the command line (found in {source})")
            if name in files:
                raise ConfigError(f"--{name} given twice on the command line ({files[name]!r} and {value!r})")
            files[name] = value
            continue
        add_option(layer, name, value, source, f"--{name}")
    return layer, files


def read_toml(path: str | os.PathLike[str]) -> Layer:
    """A flat TOML file whose keys are option names (SimpleTuner's config.toml too): config_files."""
    return read_config_file(path)


def read_env(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Layer:
    """A SimpleTuner config.env file, mapped to settings through the variable table.

    Order of precedence inside the file: option variables < DEBUG_EXTRA_ARGS < TRAINER_EXTRA_ARGS (the
    order of SimpleTuner's train.sh command line). See config/simpletuner.py for the variables that set no
    option (process environment, ignored, refused) and for helper variables.
    """
    layer = Layer()
    flag_layers: dict[str, Layer] = {}
    document = read_env_document(path, environ)
    final = final_assignments(document.assignments)
    values = {a.name: a.value for a in final}
    for a in final:
        source = f"{path}:{a.line} ({a.name})"
        row = TEMPLATE_VARIABLES.get(a.name)
        if a.name in FLAG_VARIABLES:
            try:
                tokens = shlex.split(a.value)
            except ValueError as exc:
                raise ConfigError(f"{path}:{a.line}: cannot split {a.name}: {exc}") from None
            flag_layers[a.name], _ = parse_flags(tokens, source)
        elif a.name in ENV_FIELDS:
            spec = ENV_FIELDS[a.name]
            if a.value.strip() == "":
                continue  # an empty variable sets nothing, as an unset one
            if spec.type is bool or spec.env_true_value is not None:
                on = parse_bool(a.value)
                if on is None:
                    raise ConfigError(f"invalid value for {a.name}: {a.value!r} (from {path}:{a.line}); "
                                      f"expected true or false")
                if on:  # `true` adds the flag; `false` adds nothing
                    value = True if spec.type is bool else spec.env_true_value
                    layer.settings.append(Setting(spec.name, coerce_value(spec, value, source), source))
                continue
            layer.settings.append(Setting(spec.name, coerce_value(spec, a.value, source), source))
        elif a.name in ENV_IGNORED:
            if not _is_off(a.value):
                layer.warnings.append(f"{a.name}={a.value} (from {path}:{a.line}) ignored: "
                                      f"{OPTIONS[ENV_IGNORED[a.name]].reason}")
        elif row is not None:
            if is_off(a.value) or (row.only_with and is_off(values.get(row.only_with, ""))):
                continue
            if row.action == "refuse":
                raise UnsupportedFeatureError(f"{a.name}={a.value} (from {path}:{a.line}) is not supported: "
                                              f"{row.reason}")
            message = f"{path}:{a.line}: {a.name}={a.value} ignored: {row.reason}"
            (layer.warnings if row.warn else layer.notes).append(message)
        elif is_process_variable(a.name):
            layer.environment[a.name] = a.value
        elif a.name in document.referenced:
            continue  # a helper: only read by other variables' ${...} expansions (BASE_DIR)
        else:
            known = [*ENV_FIELDS, *ENV_IGNORED, *TEMPLATE_VARIABLES, *FLAG_VARIABLES]
            layer.warnings.append(f"{path}:{a.line}: {a.name} is not a config.env variable expertune knows; "
                                  f"ignored{suggest(a.name, known)}")
    for name in FLAG_VARIABLES:
        extra = flag_layers.get(name)
        if extra is not None:
            layer.settings += extra.settings
            layer.warnings += extra.warnings
    return layer


def apply_process_environment(variables: Mapping[str, str]) -> None:
    """Export config.env's process-environment variables (TOKENIZERS_PARALLELISM, HF_HOME, WANDB_MODE, ...),
    as sourcing the file in a shell would: the file's value wins over the inherited one."""
    for name, value in variables.items():
        if os.environ.get(name) != value:
            log.info("config.env sets %s=%s in the environment of the run", name, shown_value(name, value))
        os.environ[name] = value


def _merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    values = {name: spec.default for name, spec in FIELDS.items()}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    for layer in layers:
        for s in layer.settings:
            values[s.name], sources[s.name] = s.value, s.source
        warnings += layer.warnings
        for note in layer.notes:
            log.info(note)
        apply_process_environment(layer.environment)
    return values, sources, warnings


def load_config(argv: list[str], *, environ: Mapping[str, str] | None = None,
                find_config: bool = False) -> tuple[Config, list[str]]:
    """Build the validated Config from a verb's options.

    ``argv`` may hold ``--config FILE`` (TOML, SimpleTuner's config.json / config.toml, or a config.env: see
    config_files), ``--env FILE`` (config.env) and any option flags. With ``find_config`` and neither file
    given, the file SimpleTuner would find by itself (config/config.json, CONFIG_BACKEND, ENV) is read.
    ``environ`` (default ``os.environ``) supplies ``$VAR`` values that config.env does not set.
    Returns the config and the warnings, each also logged on the ``expertune.config`` logger.
    Raises ConfigError / UnsupportedFeatureError (exit code 2). Does not require the training-only
    settings: call ``Config.require_for_training()`` for that. A seed of -1 stays -1 here (`draw_seed`).
    """
    cli, files = parse_flags(list(argv), "command line", allow_files=True)
    if find_config and not files:
        found = find_default_config(environ)
        if found is not None:
            log.info("reading %s (found as SimpleTuner would: no --config or --env given)", found)
            files["config"] = str(found)
    layers = []
    if "config" in files:
        path = Path(files["config"])
        layers.append(read_env(path, environ) if config_kind(path) == "env" else read_config_file(path))
    if "env" in files:
        layers.append(read_env(files["env"], environ))
    layers.append(cli)
    values, sources, warnings = _merge(layers)
    if not values["offset_noise"] and "noise_offset" in sources:
        warnings.append(f"noise_offset (from {sources['noise_offset']}) has no effect without offset_noise=true "
                        "(as in SimpleTuner)")
    for message in warnings:
        log.warning(message)
    return validate_values(values, sources), warnings


def draw_seed(config: Config, kept: int | None = None) -> Config:
    """`seed = -1` (SimpleTuner's "random") made concrete: `kept` (a resumed checkpoint's seed) or one drawn now
    from the OS; recorded in the config, hence in run.json, so the run can be repeated. Other seeds unchanged."""
    if config.train.seed != -1:
        return config
    seed = kept if kept is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    log.info("seed -1: %s seed %d (recorded in run.json; --seed %d repeats the run)",
             "the checkpoint's" if kept is not None else "drew", seed, seed)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def config_from_mapping(values: Mapping[str, Any], source: str = "mapping") -> Config:
    """Validate a flat ``{option: value}`` mapping (or ``Config.to_dict()`` output) into a Config.

    Values may be typed (as in run.json) or text. Unknown names are errors.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    layer = Layer()
    for key, raw in flat.items():
        spec = FIELDS.get(key)
        if spec is None:
            raise ConfigError(f"unknown option {key!r} (from {source})" + suggest(key, FIELDS))
        layer.settings.append(Setting(key, coerce_value(spec, raw, source), source))
    merged, sources, _ = _merge([layer])
    return validate_values(merged, sources)


__all__ = ["load_config", "config_from_mapping", "draw_seed", "parse_flags", "read_toml", "read_env", "Setting",
           "Layer", "ENV_FIELDS", "ENV_IGNORED", "EXTRA_ARGS_VAR"]
