"""Where a model comes from (a local directory or file, or a Hugging Face hub id), and what its load tells the user.

`check_model_source` runs before any weights load: a hub id is checked by fetching its `model_index.json` (a few
hundred bytes, into the hub cache the weights will use), so a model that cannot be had stops the run with one
line saying why and what to do — no network, not in the local cache at HF_HOME, gated without a token, no such
repository, no such revision — from huggingface_hub's own exceptions. `log_loaded` is the line each loaded part
gets: its parameters, bytes and the seconds it took (downloads included).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from expertune.errors import ModelError

log = logging.getLogger(__name__)


def looks_like_path(source: str) -> bool:
    """A string only a file system could mean: absolute, `./`, `../`, `~`, a backslash, more than one `/`, or a
    file name ending (a hub id is `name` or `owner/name`)."""
    return (os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.count("/") > 1
            or source.endswith((".safetensors", ".ckpt", ".json")))


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub reads and writes (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def check_model_source(source: str, revision: str | None = None) -> None:
    """Refuse, with the reason and the fix, a model that is neither on disk nor to be had from the hub.

    A local path that exists is left to the loaders (they check its layout); anything else must be a hub id whose
    `model_index.json` can be fetched (or is in the cache, offline).
    """
    if Path(source).expanduser().exists():
        return
    if looks_like_path(source):
        raise ModelError(f"model path {source!r} does not exist: pass an existing local diffusers SDXL directory "
                         "(with model_index.json) or a Hugging Face hub id such as segmind/SSD-1B")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        hf_hub_download(source, "model_index.json", revision=revision)
    except HFValidationError as error:
        raise ModelError(f"model {source!r} is neither an existing local directory nor a valid Hugging Face hub "
                         f"id ({error}); pass a local diffusers SDXL directory or an id such as segmind/SSD-1B") from None
    except Exception as error:  # huggingface_hub's errors are mapped one by one in hub_error
        mapped = hub_error(source, revision, error)
        if mapped is None:
            raise
        raise mapped from error


def hub_error(source: str, revision: str | None, error: BaseException) -> ModelError | None:
    """The one-line ModelError for a huggingface_hub failure to fetch `source`, or None for another error."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    page = f"{constants.ENDPOINT}/{source}"
    at = f" at revision {revision!r}" if revision else ""
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        if constants.HF_HUB_OFFLINE:
            return ModelError(
                f"model {source!r}{at} is not in the local Hugging Face cache at {cache}, and HF_HUB_OFFLINE=1 "
                f"forbids downloading it: fetch it once with network (`hf download {source}`, or run without "
                "HF_HUB_OFFLINE), point HF_HOME at the cache that holds it, or pass a local directory")
        return ModelError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to fetch model {source!r}{at}, and it is not "
            f"in the local cache at {cache}: check the network (proxy, HF_ENDPOINT), point HF_HOME at a cache that "
            "holds it, or pass a local directory")
    if isinstance(error, GatedRepoError):
        who = "the token in use has not been granted access" if get_token() else "no Hugging Face token is set"
        return ModelError(f"model {source!r} is gated and {who}: accept its terms on {page}, then {login} "
                          "with a token of that account")
    if isinstance(error, RepositoryNotFoundError):
        private = "" if get_token() else f" (a private one needs a token: {login})"
        return ModelError(f"no model {source!r} on the Hugging Face hub{private}: check the id's spelling, or pass "
                          "a local diffusers SDXL directory")
    if isinstance(error, RevisionNotFoundError):
        return ModelError(f"model {source!r} has no revision {revision!r}: pass a branch, tag or commit that exists "
                          f"(see {page}/tree/main), or leave --revision unset for main")
    if isinstance(error, RemoteEntryNotFoundError):
        return ModelError(f"hub repository {source!r}{at} has no model_index.json: it is not a diffusers pipeline; "
                          "expertune needs an SDXL-family diffusers pipeline repository (unet/, vae/, text_encoder/, "
                          "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return ModelError(f"the Hugging Face hub answered HTTP {status} for model {source!r}{at}: "
                          f"{str(error).splitlines()[0]}; retry later, or pass a local directory")
    return None


def hub_failure(source: str, revision: str | None, error: BaseException, subfolder: str) -> ModelError:
    """The ModelError for a part of hub model `source` that did not load: the mapped huggingface_hub exception
    found in the error's chain (diffusers and transformers wrap it), else the library's own first line."""
    cause: BaseException | None = error
    while cause is not None:
        mapped = hub_error(source, revision, cause)
        if mapped is not None:
            return mapped
        cause = cause.__cause__ or cause.__context__
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelError(f"could not load '{subfolder}' of hub model {source!r}: {first}")


def describe_source(source: str, revision: str | None) -> str:
    """How a model is read, for the log: a local path, or a hub id with its revision and the cache it goes to."""
    if Path(source).expanduser().exists():
        return f"{source} (local)"
    return f"{source} (hub id, revision {revision or 'main'}; files are fetched into {hub_cache_dir()})"


def _size(number: float, units: tuple[str, ...], base: float) -> str:
    for unit in units[:-1]:
        if abs(number) < base:
            return f"{number:.3g} {unit}".strip()
        number /= base
    return f"{number:.3g} {units[-1]}"


def part_size(module: Any) -> tuple[int, int]:
    """(parameters, bytes) of a loaded part (a torch module); (0, 0) for one without parameters (a tokenizer)."""
    parameters = getattr(module, "parameters", None)
    if parameters is None:
        return 0, 0
    count = size = 0
    for parameter in parameters():
        count += parameter.numel()
        size += parameter.numel() * parameter.element_size()
    return count, size


def log_loaded(source: str, subfolder: str, module: Any, seconds: float) -> None:
    """One line per loaded part: `loaded unet of SOURCE: 2.57 G parameters, 5.14 GB (float16) in 41.2 s`."""
    count, size = part_size(module)
    what = ""
    if count:
        dtype = str(getattr(module, "dtype", "")).replace("torch.", "")
        what = (f": {_size(count, ('', 'k', 'M', 'G'), 1000)} parameters, "
                f"{_size(size, ('B', 'kB', 'MB', 'GB', 'TB'), 1000)} ({dtype})")
    log.info("loaded %s of %s%s in %.1f s", subfolder, source, what, seconds)
