"""The files `--config` reads, and the one SimpleTuner finds by itself.

`--config FILE` takes, told apart by extension and then by content:
- `.json`: SimpleTuner's config.json, a flat object of flags (`"--checkpoint_step_interval": 500` or without
  the `--`), values often strings coerced as SimpleTuner does ("true", "500", "1e-4"); null or "" sets nothing;
- `.env`: a SimpleTuner config.env (as `--env`);
- anything else: TOML, flat `name = value` lines: expertune's own keys, or SimpleTuner's config.toml (keys
  with or without `--`). A file with another extension that starts with `{` is read as JSON.
Every key goes through `layers.add_option`, so SimpleTuner's spellings (the flag table) hold in all of them.

With neither `--config` nor `--env`, `train` and `cache` look where SimpleTuner does (`find_default_config`):
`CONFIG_PATH` (a file, or a folder holding config.json), else `config/` or `config/<ENV>/` (ENV,
SIMPLETUNER_ENV or SIMPLETUNER_ENVIRONMENT) holding config.json, config.toml or config.env, in that order or
the one `CONFIG_BACKEND` (SIMPLETUNER_CONFIG_BACKEND, CONFIG_TYPE) names.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from expertune.config.layers import Layer, add_option, known_names
from expertune.config.schema import SECTIONS
from expertune.config.validate import suggest
from expertune.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = {"json": "config.json", "toml": "config.toml", "env": "config.env"}


def config_kind(path: Path) -> str:
    """"json", "env" or "toml": by extension, else by the file's first character."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".env", ".toml"):
        return suffix[1:]
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return "json" if head.startswith(b"{") else "toml"


def _load(path: Path, kind: str) -> dict[str, Any]:
    try:
        if kind == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold one JSON object of options ({{\"--name\": value, ...}}), not "
                          f"{type(data).__name__}")
    return data


def read_config_file(path: str | os.PathLike[str]) -> Layer:
    """A `--config` file of any of the shapes above (config.env excepted: see `config_kind`)."""
    p = Path(path)
    kind = config_kind(p)
    data = _load(p, kind)
    simpletuner = kind == "json" or any(key.startswith("--") for key in data)
    source = f"{'SimpleTuner ' if simpletuner else ''}{'JSON' if kind == 'json' else 'TOML'} file {p}"
    layer = Layer()
    for key, raw in data.items():
        name = key[2:] if key.startswith("--") else key
        label = f"key {key!r}"
        if isinstance(raw, (dict, list)):
            hint = " (a section name: the file is flat, put its keys at the top level)" if key in SECTIONS else ""
            what = "tables are" if kind == "toml" else "nested values are"
            raise ConfigError(f"unknown key {key!r} in {p}: {what} not supported{hint}; write `option = value` "
                              "pairs at the top level")
        if raw is None or (kind == "json" and raw == ""):
            continue  # SimpleTuner passes no flag for an empty value
        if isinstance(raw, str) and len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]  # SimpleTuner strips one pair of quotes around a value
        if not add_option(layer, name, raw, source, label):
            raise ConfigError(f"unknown key {key!r} in {p}" + suggest(name, known_names()))
    return layer


def find_default_config(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The config file SimpleTuner would read here, or None (see the module docstring)."""
    env = os.environ if environ is None else environ
    base = cwd or Path.cwd()
    override = env.get("CONFIG_PATH")
    if override:
        path = Path(override).expanduser()
        path = path if path.is_absolute() else base / path
        found = path / "config.json" if path.is_dir() else path if path.suffix else path.with_suffix(".json")
        if not found.is_file():
            raise ConfigError(f"CONFIG_PATH={override} names no config file ({found} does not exist)")
        return found
    name = env.get("SIMPLETUNER_ENVIRONMENT") or env.get("SIMPLETUNER_ENV") or env.get("ENV") or "default"
    if Path(name).is_absolute():
        name = "default"  # sh's own ENV (a startup file), not a SimpleTuner environment
    folder = base / "config" if name == "default" else base / "config" / name
    backend = (env.get("SIMPLETUNER_CONFIG_BACKEND") or env.get("CONFIG_BACKEND") or env.get("CONFIG_TYPE") or "")
    backend = backend.strip().lower()
    if backend:
        if backend not in BACKENDS:
            raise ConfigError(f"CONFIG_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
        path = folder / BACKENDS[backend]
        if not path.is_file():
            raise ConfigError(f"CONFIG_BACKEND={backend} but {path} does not exist; create it or pass --config FILE")
        return path
    for filename in BACKENDS.values():
        if (folder / filename).is_file():
            return folder / filename
    return None
