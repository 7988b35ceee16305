"""Issue 25: the foreach EMA gives the per-tensor loop's numbers, AdamW's kernel per device, cuDNN's TF32 left at
PyTorch's default, and the batch feed (prefetching) hands out the same batches in the same order, leaving no
thread behind."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from expertune.data.batches import MicroBatch, micro_batches
from expertune.models.tiny import tiny_layout
from expertune.train import device as device_settings
from expertune.train.ema import ExponentialMovingAverage, ema_decay
from expertune.train.optim import adamw_kernel, build_optimizer
from expertune.train.prefetch import BatchFeed


def _tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_layout().unet)


def test_foreach_ema_matches_the_per_tensor_loop_on_the_tiny_unet() -> None:
    unet = _tiny_unet()
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = ExponentialMovingAverage(params, max_decay=0.99, device="cpu")
    reference = [p.detach().clone().float() for p in params]
    generator = torch.Generator().manual_seed(3)
    for update in range(1, 4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
        decay = ema.update(params)
        assert decay == ema_decay(update, 0.99)
        for shadow, p in zip(reference, params):  # today's loop, one lerp_ per tensor
            shadow.lerp_(p.detach().float(), 1.0 - decay)
    for ours, theirs in zip(ema.shadow, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="parameters for"):
        ema.update(params[:-1])


def test_ema_copies_other_dtypes_over_before_the_update() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = ExponentialMovingAverage([weight], max_decay=0.5, device="cpu")
    ema.update([weight])
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 6.0]))
    decay = ema.update([weight])
    assert ema.shadow[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow[0], decay * torch.tensor([1.0, 2.0]) + (1 - decay) * torch.tensor([3.0, 6.0]))


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere_with_the_loops_numbers() -> None:
    assert adamw_kernel(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_kernel(torch.device("cpu")) == {"foreach": True} == adamw_kernel(None)
    from expertune.config.schema import TrainConfig

    def trained(kernel: dict[str, bool] | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(64, 32), (32,), (4, 4, 3, 3)]]
        optimizer = (build_optimizer(params, TrainConfig(learning_rate=1e-3), torch.device("cpu")) if kernel
                     else torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, eps=1e-8))
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        if kernel:
            assert optimizer.param_groups[0]["foreach"] is True
        return [p.detach() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(trained({"foreach": True}), trained(None)))


def test_allow_tf32_sets_matmul_only_and_leaves_cudnn_at_its_default() -> None:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert device_settings.apply_tf32(False, torch.device("cuda", 0)) is False
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is True
        assert device_settings.apply_tf32(True, torch.device("cuda", 0)) is True
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ---- the batch feed, over stand-in caches (plain tensors, a delay per read) --------------------------------------

@dataclass(frozen=True)
class _Item:
    record: int
    spec: None = None
    captions: tuple[str, ...] = ("a",)


class _Caches:
    """Latent and embedding caches that compute each entry from its key, taking `delay` seconds per read."""

    def __init__(self, delay: float, fail_at: int | None = None) -> None:
        self.delay, self.fail_at, self.reads = delay, fail_at, 0
        self.threads: set[str] = set()

    def flips_at(self, epoch: int, index: int) -> bool:
        return False  # no --flip_images

    def load(self, record: object, spec: object = None, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if isinstance(record, str):  # the embedding cache: (prompt embeds, pooled)
            return torch.zeros(3, 4), torch.zeros(4)
        if record == self.fail_at:
            raise OSError(f"entry {record} unreadable")
        return torch.full((2, 2, 2), float(record)), torch.arange(6.0)


def _run(items: int, delay: float, fail_at: int | None = None) -> SimpleNamespace:
    caches = _Caches(delay, fail_at)
    prepared = SimpleNamespace(items=[_Item(i) for i in range(items)], latent_cache=caches, embed_cache=caches,
                               mask_cache=None)
    expert = SimpleNamespace(index=0, stream=micro_batches(items, 2, seed=5), prepared=prepared)
    run = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")))
    return SimpleNamespace(run=run, expert=expert, caches=caches)


def _steps(setup: SimpleNamespace, prefetch: bool, steps: int, work: float = 0.0
           ) -> list[tuple[MicroBatch, torch.Tensor]]:
    taken = []
    with BatchFeed(setup.run, prefetch) as feed:  # type: ignore[arg-type]
        for _ in range(steps):
            for micro, batch in feed.take(setup.expert, 2):
                taken.append((micro, batch.latents[:, 0, 0, 0].clone()))
            time.sleep(work)  # the step's compute
    return taken


def _feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("expertune-prefetch")]


def test_prefetching_hands_out_the_same_batches_in_the_same_order_and_overlaps_the_reads() -> None:
    plain, ahead = _run(12, 0.0), _run(12, 0.002)
    expected = _steps(plain, prefetch=False, steps=7)
    started = time.perf_counter()
    got = _steps(ahead, prefetch=True, steps=7, work=0.03)
    elapsed = time.perf_counter() - started
    assert [m for m, _ in got] == [m for m, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))
    assert any(name.startswith("expertune-prefetch") for name in ahead.caches.threads)
    # 7 steps of 30 ms compute; 8 reads of 2 ms a step are hidden behind it from the second step on
    assert elapsed < 7 * 0.03 + 2 * 8 * 0.002 + 0.1
    assert not _feed_threads()


def test_a_failed_read_surfaces_in_the_loop_and_an_early_stop_leaves_no_thread() -> None:
    setup = _run(12, 0.001, fail_at=-1)
    with pytest.raises(RuntimeError, match="stop"):
        with BatchFeed(setup.run, True) as feed:  # type: ignore[arg-type]
            feed.take(setup.expert, 2)
            raise RuntimeError("stop")
    assert not _feed_threads()
    stream = micro_batches(12, 2, seed=5)
    second_step = [next(stream) for _ in range(4)][2].indices[0]  # read ahead, on the feed's thread
    broken = _run(12, 0.0, fail_at=second_step)
    with BatchFeed(broken.run, True) as feed:  # type: ignore[arg-type]
        feed.take(broken.expert, 2)
        with pytest.raises(OSError, match=f"entry {second_step} unreadable"):
            feed.take(broken.expert, 2)
    assert not _feed_threads()


def test_a_cpu_ema_of_gpu_weights_stages_them_through_pinned_memory() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the staged copy is the GPU-to-host path of --ema_device cpu")
    weights = [torch.nn.Parameter(torch.randn(64, 64, device="cuda")), torch.nn.Parameter(torch.randn(7, device="cuda"))]
    ema = ExponentialMovingAverage(weights, max_decay=0.9, device="cpu")
    ema.update(weights)
    with torch.no_grad():
        for w in weights:
            w.mul_(2)
    decay = ema.update(weights)
    assert ema._staging is not None and all(t.is_pinned() for t in ema._staging)
    for shadow, w in zip(ema.shadow, weights):
        torch.testing.assert_close(shadow, (w.detach().cpu() / 2).lerp(w.detach().cpu(), 1 - decay))
