"""expertune's configuration: typed sections (schema) built from TOML, config.env and flags (sources)."""

from expertune.config.schema import FIELDS, Config, FieldSpec, default_cache_dir, parse_timestep_range, required
from expertune.config.sources import config_from_mapping, load_config

__all__ = ["Config", "FIELDS", "FieldSpec", "load_config", "config_from_mapping", "default_cache_dir",
           "parse_timestep_range", "required"]
