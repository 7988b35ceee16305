"""One cache entry's bytes: safetensors with a digest of its header and tensor bytes, and finite values only.

`encode_entry` makes the bytes `CacheStore.put` writes; `verify_entry` is the check a first read makes. The
digest is XXH3-128 (xxhash; tens of GB/s, so checking costs little beside reading) of the header's tensor
descriptions and other metadata, and of the tensor bytes: a flipped bit anywhere, or a header rewritten into
other valid JSON, changes it. See `expertune.cache.store` for when entries are checked.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

DIGEST_FIELD = "expertune_digest"  # metadata: `entry_digest` of the entry, checked whenever it is first read
_MAX_HEADER = 100_000_000  # safetensors' own upper bound for a header


class NonFiniteEntry(ValueError):
    """Tensors holding NaN or infinity: never stored (a cached NaN poisons every run that trains on it)."""


class DamagedEntry(ValueError):
    """An entry whose bytes do not prove themselves (torn, bit-flipped, non-finite, or without a digest)."""


NO_DIGEST = "no digest"


def _split(data: bytes) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of serialised safetensors; DamagedEntry when they do not fit the bytes."""
    if len(data) < 8:
        raise DamagedEntry(f"{len(data)} bytes, shorter than a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > _MAX_HEADER or 8 + header_size > len(data):
        raise DamagedEntry(f"header length {header_size} does not fit a {len(data)}-byte file")
    try:
        header = json.loads(data[8:8 + header_size])
        end = max((int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DamagedEntry(f"the header is garbled ({exc})") from None
    if 8 + header_size + end != len(data):
        raise DamagedEntry(f"header describes {8 + header_size + end} bytes, the file has {len(data)}")
    return header, 8 + header_size


def entry_metadata(data: bytes) -> dict[str, str]:
    return dict(_split(data)[0].get("__metadata__") or {})


def entry_digest(header: Mapping[str, Any], payload: bytes | memoryview) -> str:
    """XXH3-128 of an entry's header (every tensor's dtype, shape and offsets, and the metadata less the digest
    itself) and its tensor bytes: a flipped bit anywhere, or a header rewritten to other valid JSON, changes it."""
    described = {name: info for name, info in header.items() if name != "__metadata__"}
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != DIGEST_FIELD}
    hasher = xxhash.xxh3_128()
    hasher.update(json.dumps({"tensors": described, "metadata": metadata}, sort_keys=True).encode("utf-8"))
    hasher.update(payload)
    return str(hasher.hexdigest())


_HALF_EXPONENTS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, without `isfinite`'s cost on a CPU: 16-bit floats by their exponent bits;
    others by a float32 sum, NaN or infinite if any value is (only such a sum — a NaN, or an overflow of huge
    values — is then checked value by value)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.numel() == 0:
        return True
    exponent = _HALF_EXPONENTS.get(tensor.dtype)
    if exponent is not None:  # 16-bit floats: a value is finite unless its exponent bits are all ones
        bits = tensor.contiguous().view(torch.int16).numpy()
        return int((bits & 0x7FFF).max()) < exponent
    if tensor.is_floating_point() and math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in tensors.items() if not _finite(tensor)]


def encode_entry(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of an entry, with its `entry_digest` in the metadata; NonFiniteEntry naming the
    tensors that hold NaN or infinity."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("cache entry metadata must map str to str")
    own = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    if bad := _non_finite(own):
        raise NonFiniteEntry(f"tensor(s) {', '.join(bad)} hold NaN or infinity")
    plain = {k: v for k, v in metadata.items() if k != DIGEST_FIELD}
    first = save_safetensors(own, metadata=plain)
    header, start = _split(first)
    return save_safetensors(own, metadata={**plain, DIGEST_FIELD: entry_digest(header, memoryview(first)[start:])})


def verify_entry(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an entry's bytes once they prove themselves: the header fits the file, the digest
    matches, every value is finite. DamagedEntry saying what failed (`NO_DIGEST` for an older entry)."""
    header, start = _split(data)
    metadata = dict(header.get("__metadata__") or {})
    digest = metadata.get(DIGEST_FIELD)
    if digest is None:
        raise DamagedEntry(NO_DIGEST)
    if digest != entry_digest(header, memoryview(data)[start:]):
        raise DamagedEntry("its bytes do not match its digest")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DamagedEntry(f"unreadable: {exc}") from None
    if bad := _non_finite(tensors):
        raise DamagedEntry(f"tensor(s) {', '.join(bad)} hold NaN or infinity")
    return tensors, metadata
