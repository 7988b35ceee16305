"""Two real jobs on one cache store: a stage-2 training job starts while stage 1 is still building it.

Stage 1 is `expertune cache` (building the store a stage-1 run needs), stage 2 a one-step
`expertune train`, which reads every entry of its single batch back. The test holds four entry
locks so stage 1 is provably mid-build when stage 2 starts, then lets both race for those entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FAST_FLAGS, write_stage_env
from expertune.cache.embeds import EmbedCache
from expertune.cache.latents import LatentCache
from expertune.cache.store import CacheStore, EntryLock
from expertune.config import load_config
from expertune.data.records import discover_records
from expertune.data.transforms import image_to_tensor, load_image
from expertune.models.sdxl import load_components
from expertune.prepare import load_datasets
from expertune.validate.plan import prompt_texts as validation_prompts

JOB_FLAGS = [*FAST_FLAGS, "--max_train_steps=1", "--validation_disable", "--report_to=none", "--vae_batch_size=2",
             "--gradient_checkpointing=false"]


def _dataset(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(8):
        pixels = rng.integers(0, 256, size=(64 + 8 * index, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"noise_{index}.png")
        (images / f"noise_{index}.txt").write_text(f"noise picture number {index}\n", encoding="utf-8")
    loader = root / "dataloader.json"
    loader.write_text(json.dumps([
        {"id": "noise", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": 64, "crop_style": "random", "cache_dir_vae": str(root / "shared" / "latents")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "shared" / "text")},
    ]))
    return loader


def _lock_fds(pid: int) -> int:
    """How many entry-lock files the process has open (it is waiting for, or holding, entries)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).endswith(".lock")
        except OSError:
            pass
    return count


def _wait(condition, what: str, jobs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for job in jobs:
            if job.poll() is not None:
                raise AssertionError(f"a job ended (rc {job.returncode}) while waiting for {what}: {job.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.integration
def test_stage_2_started_while_stage_1_builds_the_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    loader = _dataset(tmp_path)
    envs = [write_stage_env(tmp_path, stage, tiny_model_dir, tmp_path / f"stage{stage}", loader) for stage in (1, 2)]

    # The keys both jobs need, computed here the way they compute them.
    config, _ = load_config(["--env", str(envs[0]), *JOB_FLAGS])
    (spec,) = load_datasets(config).datasets
    records = discover_records(spec).records
    components = load_components(str(tiny_model_dir), with_unet=False)
    latents = LatentCache(components.vae, seed=config.train.seed, batch_size=2)
    embeds = EmbedCache((components.tokenizer_1, components.tokenizer_2),
                        (components.text_encoder_1, components.text_encoder_2),
                        store=CacheStore(tmp_path / "shared" / "text"), batch_size=4)
    latent_keys = {latents.key_for(record, spec) for record in records}
    captions = [c for record in records for c in record.captions] + validation_prompts(config)
    embed_keys = {embeds.key_for(caption) for caption in captions}
    assert len(latent_keys) == 8 and len(embed_keys) == 8  # validation is disabled: no prompt to cache
    latent_store, embed_store = latents.store_for(spec), embeds.store

    # Hold half the latent entries, so stage 1 is still building when stage 2 starts.
    held: list[EntryLock] = [latent_store.lock(key) for key in sorted(latent_keys)[:4]]
    command = [sys.executable, "-m", "expertune.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    jobs: list[subprocess.Popen] = []
    try:
        stage1 = subprocess.Popen([*command, "cache", "--stats_json", str(tmp_path / "stage1.json"), "--env",
                                   str(envs[0]), *JOB_FLAGS], env=env, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        jobs.append(stage1)
        _wait(lambda: len(latent_store.journal()) == 4 and _lock_fds(stage1.pid) > 0,
              "stage 1 to write the free entries and wait for the held ones", jobs)
        stage2 = subprocess.Popen([*command, "train", "--env", str(envs[1]), *JOB_FLAGS], env=env, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        jobs.append(stage2)
        _wait(lambda: _lock_fds(stage2.pid) > 0, "stage 2 to wait for the held entries", jobs)
        assert stage1.poll() is None  # stage 1 is still building
    finally:
        for lock in held:
            lock.release(done=False)  # give up without writing: the two jobs race for these entries
    for job in jobs:
        _, stderr = job.communicate(timeout=180)
        assert job.returncode == 0, stderr

    # The store holds exactly the distinct keys, each encoded exactly once across both jobs.
    for store, keys in ((latent_store, latent_keys), (embed_store, embed_keys)):
        assert {p.stem for p in store.root.rglob("*.safetensors")} == keys
        assert Counter(store.journal()) == Counter({key: 1 for key in keys})
        assert not list(store.root.rglob("*.lock")) and not list(store.root.rglob("*.tmp"))
    runs = [json.loads((tmp_path / "stage1.json").read_text()), json.loads((tmp_path / "stage2" / "run.json").read_text())]
    assert runs[0]["cache"]["latents_encoded"] + runs[1]["cache"]["latents_encoded"] == 8
    assert runs[0]["cache"]["embeds_encoded"] + runs[1]["cache"]["embeds_encoded"] == 8
    assert runs[0]["cache"]["latents_encoded"] >= 4  # the free half was stage 1's before stage 2 started
    for run in runs:
        cache = run["cache"]
        assert cache["latents_encoded"] + cache["latents_reused"] == 8
        assert cache["embeds_encoded"] + cache["embeds_reused"] == 8
        assert run["skipped_images"] == []
    assert runs[1]["steps"] == 1 and runs[1]["final"]["samples"] == 8  # stage 2 read all 8 entries back
    # Every entry is valid: what was cached is what this process computes.
    for record in records:
        latent, time_ids = latents.load(record, spec)
        plan = latents.planned(record, spec).plan
        expected = latents.encode_pixels(image_to_tensor(load_image(record.path), plan)[None])[0]
        torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)
        assert time_ids.tolist() == list(plan.time_ids())
    for caption in captions:
        prompt_embeds, pooled = embeds.load(caption)
        assert prompt_embeds.shape[0] == 77 and torch.isfinite(prompt_embeds).all() and pooled.ndim == 1
