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


class StorageError(ExpertuneError):
    """The disk refused a write that matters (full, read-only); nothing partial was left behind."""

    exit_code = 3


class NonFiniteError(ExpertuneError):
    """Training produced NaN or infinite numbers: updates in a row skipped, or weights no longer finite."""


class TrainingInterrupted(ExpertuneError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; exit code 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class AcceleratorFailure(ExpertuneError):
    """The accelerator failed mid-run (CUDA out of memory, a device-side error): the settings in use and what would
    fit are in the message, the library's traceback behind `-v`."""

    exit_code = 4


class HubUploadError(ExpertuneError):
    """The upload to the Hugging Face hub failed after the experts were saved locally (nothing is lost)."""

    exit_code = 5
