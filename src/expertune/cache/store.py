"""A content-addressed store of tensors: one safetensors file per key, written atomically.

A key is the SHA-256 of everything that determines the entry's content (`cache_key`), so two jobs
that would compute the same tensors — stage 1 and stage 2 on one dataset — find the same file, and
anything that changes the content (image bytes, crop, model weights, dtype) gives a new key instead
of a stale hit. Files hold no pickle: tensors and a str->str metadata header only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from expertune.io_utils import atomic_write_bytes

logger = logging.getLogger("expertune.cache")

FORMAT_VERSION = 1  # bump when the meaning of stored entries changes: every key changes with it

_KEY = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100_000_000  # safetensors' own upper bound for a header
_CONFIG_KEYS_IGNORED = frozenset(
    # Names, versions and run-time switches that do not change what the weights compute.
    {
        "transformers_version", "dtype", "torch_dtype", "output_hidden_states", "output_attentions",
        "return_dict", "use_cache",
    }
)


@dataclass(frozen=True)
class CacheStats:
    """What one `ensure` did: distinct entries written (`encoded`) and found intact (`reused`)."""

    encoded: int
    reused: int


def _canonical_json(value: Any) -> str:
    def refuse(item: Any) -> Any:
        raise TypeError(f"cache key parts must be JSON values (str, int, float, bool, None, list, dict); got {item!r}")

    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=refuse
    )


def cache_key(kind: str, parts: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of {kind, parts, format_version}; tuples count as lists."""
    payload = {"kind": kind, "parts": dict(parts), "format_version": FORMAT_VERSION}
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


def _config_dict(module: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(module, "config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        key: value
        for key, value in as_dict.items()
        if not str(key).startswith("_") and key not in _CONFIG_KEYS_IGNORED
    }


def module_fingerprint(module: torch.nn.Module) -> str:
    """BLAKE2b of the class name, the config and every state_dict tensor (name, dtype, shape, bytes).

    Content only: the same weights loaded from two directories give the same fingerprint (names,
    paths and library versions in the config are left out).
    """
    hasher = hashlib.blake2b(digest_size=32)
    hasher.update(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    config = _config_dict(module)
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8") + b"\n")
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            hasher.update(flat.view(torch.uint8).numpy())
    return hasher.hexdigest()


def file_digest(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex of the file's bytes, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


class CacheStore:
    """Entries live at `root/<key[:2]>/<key>.safetensors`; `put` is the one write path."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"cache keys are 64 lowercase hex digits (see cache_key); got {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        """Whether an intact entry exists: checked from its header and size, without reading tensors.

        A truncated or garbled file counts as absent (with a warning), so callers re-encode it.
        """
        path = self.path_for(key)
        try:
            size = path.stat().st_size
            with open(path, "rb") as stream:
                (header_size,) = struct.unpack("<Q", stream.read(8))
                if header_size > _MAX_HEADER or 8 + header_size > size:
                    raise ValueError(f"header length {header_size} does not fit a {size}-byte file")
                header = json.loads(stream.read(header_size))
            end = max(
                (int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"),
                default=0,
            )
            if 8 + header_size + end != size:
                raise ValueError(f"header describes {8 + header_size + end} bytes, the file has {size}")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
            logger.warning("cache entry %s is damaged (%s); it will be rewritten", path, exc)
            return False
        return True

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata), or None when the entry is absent or cannot be read (logged)."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            logger.warning("cache entry %s cannot be read (%s); it will be re-encoded", path, exc)
            return None
        return tensors, metadata

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write the entry atomically (a temporary file in the same folder, then os.replace)."""
        path = self.path_for(key)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("cache entry metadata must map str to str")
        own = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
        atomic_write_bytes(path, save_safetensors(own, metadata=dict(metadata)))
