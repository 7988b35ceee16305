"""Errors a user can cause. The CLI prints them without a traceback and exits with `exit_code`."""

from __future__ import annotations


class ExpertuneError(Exception):
    """Base class: a problem with the user's input or environment, with a message naming the fix."""

    exit_code: int = 2


class ConfigError(ExpertuneError):
    """A bad config key or value (TOML, config.env, CLI flag or dataloader JSON)."""


class UnsupportedFeatureError(ConfigError):
    """The user asked for a feature expertune does not have (yet)."""


class DataError(ExpertuneError):
    """A dataset, image or caption that cannot be used."""


class ModelError(ExpertuneError):
    """A model path that is missing or is not an SDXL-layout model."""
