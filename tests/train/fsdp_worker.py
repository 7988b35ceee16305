"""One rank of the FSDP2 checkpoint test (started by torchrun from test_fsdp.py; not a test module itself).

accelerate runs FSDP only on GPUs, so this shards the tiny UNet with torch's own `fully_shard` exactly as
accelerate's TRANSFORMER_BASED_WRAP does (each BasicTransformerBlock and ResnetBlock2D, then the root), over a
gloo group of CPU processes, and drives expertune's FullySharded strategy and checkpoint code with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch.distributed.fsdp import fully_shard

from expertune.models.tiny import tiny_unet_config
from expertune.train.checkpoint import DataPosition, TrainingState, load_checkpoint, save_checkpoint
from expertune.train.strategy import FullySharded


def build(sharded: bool) -> tuple[UNet2DConditionModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_unet_config())
    if sharded:
        for module in unet.modules():
            if type(module).__name__ in ("BasicTransformerBlock", "ResnetBlock2D"):
                fully_shard(module)
        fully_shard(unet)
    return unet, torch.optim.AdamW(unet.parameters(), lr=1e-3, eps=1e-2)


def step(unet: UNet2DConditionModel, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)  # the same batch on every rank: the mean gradient is its own
    config = unet.config
    text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    sample = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    out = unet(sample, torch.tensor([10, 500]),
               encoder_hidden_states=torch.randn(2, 7, config.cross_attention_dim, generator=generator),
               added_cond_kwargs={"text_embeds": torch.randn(2, text, generator=generator),
                                  "time_ids": torch.randn(2, 6, generator=generator)}).sample
    out.pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_for(unet: UNet2DConditionModel, optimizer: torch.optim.Optimizer, strategy: FullySharded,
              steps: int) -> TrainingState:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return TrainingState(steps, DataPosition(steps, 0, steps), unet, optimizer, scheduler,
                         torch.Generator().manual_seed(1), [0, 1], strategy=strategy)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    main_rank = rank == 0

    unet, optimizer = build(sharded=True)
    strategy = FullySharded(unet, optimizer, main_rank)
    for seed in (1, 2):
        step(unet, optimizer, seed)
    snapshot = strategy.snapshot()  # collective
    if main_rank:
        save_checkpoint(out, state_for(unet, optimizer, strategy, 2), {"train": {}}, {}, snapshot)
    dist.barrier()

    # A fresh sharded model and optimizer, restored from the checkpoint, then both take the same third step.
    fresh, fresh_optimizer = build(sharded=True)
    fresh_strategy = FullySharded(fresh, fresh_optimizer, main_rank)
    load_checkpoint(out / "checkpoints" / "checkpoint-2", state_for(fresh, fresh_optimizer, fresh_strategy, 0))
    step(unet, optimizer, 3)
    step(fresh, fresh_optimizer, 3)
    continued = strategy.whole_unet("cpu")  # collective
    restored = fresh_strategy.whole_unet("cpu")

    if main_rank:
        reference, reference_optimizer = build(sharded=False)  # the same three steps, unsharded, on one rank
        for seed in (1, 2, 3):
            step(reference, reference_optimizer, seed)
        local = unet.state_dict()
        result = {
            "world_size": dist.get_world_size(),
            "sharded": all(type(v).__name__ == "DTensor" for v in local.values()),
            "local_fraction": sum(v.to_local().numel() for v in local.values()) / sum(v.numel() for v in local.values()),
            "snapshot_tensors": len(snapshot.weights),
            "optimizer_keys_are_names": all(isinstance(k, str) for k in snapshot.optimizer["state"]),
            "restored_vs_continued": max((a - b).abs().max().item() for a, b in
                                         zip(restored.state_dict().values(), continued.state_dict().values())),
            "sharded_vs_reference": max((continued.state_dict()[k] - v).abs().max().item()
                                        for k, v in reference.state_dict().items()),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
