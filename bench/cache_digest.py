"""What proving a cache entry's bytes costs: a digest-checked read against a bare read, side by side in one run.

Fills a store with `--entries` entries of SDXL's shapes (a 1024 px latent: 4x128x128 float32, 256 KiB; or a
text embedding: 77x2048 float16 + 1280 pooled, `--kind embeds`), then reads every entry, the page cache warm:

- **bare**: what a read was before entries carried a digest: `safe_open` and `get_tensor` of every tensor;
- **first**: `CacheStore.get` in a fresh store object: read, XXH3-128 digest over header and bytes, finite check
  (what the first epoch of a process pays);
- **later**: `CacheStore.get` again in the same store object: the entry is the file it proved, so no check
  (every later epoch of the process).

Prints `first_vs_bare` and `later_vs_bare` (seconds ÷ seconds, target for a warm epoch: later <= 1.05) and
`check_share` = (first - bare) / bare, each the fastest of `--rounds` interleaved rounds.

    python bench/cache_digest.py                      # latents, 512 entries
    python bench/cache_digest.py --kind embeds
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from expertune.cache.store import CacheStore, cache_key


def _bare(store: CacheStore, keys: list[str]) -> None:
    for key in keys:
        with safe_open(str(store.path_for(key)), framework="pt", device="cpu") as handle:
            {name: handle.get_tensor(name) for name in handle.keys()}


def _through(store: CacheStore, keys: list[str]) -> None:
    for key in keys:
        assert store.get(key) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=512)
    parser.add_argument("--kind", choices=("latents", "embeds"), default="latents")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        store = CacheStore(Path(folder) / "store")
        keys = []
        for index in range(args.entries):
            key = cache_key("bench", {"i": index})
            if args.kind == "latents":
                tensors = {"latent": torch.randn(4, 128, 128), "time_ids": torch.tensor([1024, 1024, 0, 0, 1024, 1024])}
            else:
                tensors = {"prompt_embeds": torch.randn(77, 2048).half(), "pooled_prompt_embeds": torch.randn(1280).half()}
            store.put(key, tensors, {"source": f"/data/{index}.png"})
            keys.append(key)
        megabytes = sum(store.path_for(key).stat().st_size for key in keys) / 2**20
        _bare(store, keys)  # warm the page cache
        times: dict[str, list[float]] = {"bare": [], "first": [], "later": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            _bare(store, keys)
            times["bare"].append(time.perf_counter() - start)
            reader = CacheStore(store.root)
            start = time.perf_counter()
            _through(reader, keys)
            times["first"].append(time.perf_counter() - start)
            start = time.perf_counter()
            _through(reader, keys)
            times["later"].append(time.perf_counter() - start)
        best = {name: min(values) for name, values in times.items()}
        print(json.dumps({
            "kind": args.kind, "entries": args.entries, "megabytes": round(megabytes, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
            **{f"{name}_s": round(value, 4) for name, value in best.items()},
            "first_vs_bare": round(best["first"] / best["bare"], 3),
            "later_vs_bare": round(best["later"] / best["bare"], 3),
            "check_share": round((best["first"] - best["bare"]) / best["bare"], 3),
            "runs": {name: [round(value, 4) for value in values] for name, values in times.items()},
        }))


if __name__ == "__main__":
    main()
