"""How the trained UNet and its optimizer are spread over the processes, and how to see them whole.

accelerate picks the engine from its config file: DDP (every process holds the whole UNet), FSDP (parameters,
gradients and optimizer state sharded) or DeepSpeed ZeRO stage 1-3. The training loop sees one interface:

- `snapshot()` gathers the full fp32 weights and the optimizer state on the main process, for a checkpoint;
- `restore()` puts them back on every process, on resume;
- `whole_unet()` gives the main process a UNet with all of its weights, for validation and export.

Checkpoints therefore keep one format (safetensors + JSON, no pickle) whatever the engine; `layout` names how the
optimizer state inside is keyed, and a checkpoint only resumes under an engine with the same layout.
`snapshot()` and `whole_unet()` are collective: every process must call them at the same point.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

from expertune.errors import ConfigError, UnsupportedFeatureError

if TYPE_CHECKING:
    from expertune.config.schema import Config


@dataclass
class Snapshot:
    """Full weights and optimizer state, filled on the main process (empty on the others)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)


def engine_requested() -> str | None:
    """The sharding engine `accelerate launch` was asked for ("fsdp", "deepspeed"), from its environment."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def check_engine_available(engine: str | None, has_gpu: bool) -> None:
    """Refuse an engine this machine cannot run, with what to use instead."""
    if engine == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UnsupportedFeatureError(
                "the accelerate config asks for DeepSpeed, which is not installed. Install it after torch with "
                "`pip install --no-build-isolation deepspeed` (see docs/distributed.md), or use a DDP/FSDP config")
    if engine == "fsdp" and not has_gpu:
        raise UnsupportedFeatureError(
            "the accelerate config asks for FSDP, but this machine has no GPU: accelerate runs FSDP only on GPUs "
            "and would silently train plain DDP here. Use examples/accelerate/cpu_two_processes.yaml (DDP) or a "
            "DeepSpeed ZeRO config (examples/accelerate/deepspeed_zero2.yaml) on CPUs")


def accelerator_options(has_gpu: bool) -> dict[str, Any]:
    """Keyword arguments for `Accelerator` that make the requested engine real on this machine, or a clear error.

    On CPUs accelerate runs DDP over gloo (`cpu=True`). It can run DeepSpeed on CPUs too, but only when told to
    use gloo itself instead of `cpu=True` (which would silently drop DeepSpeed). FSDP it cannot: with no GPU it
    quietly trains plain DDP, so that is refused rather than letting a user believe the model is sharded.
    """
    from accelerate.utils import InitProcessGroupKwargs

    engine = engine_requested()
    check_engine_available(engine, has_gpu)
    if engine == "deepspeed" and not has_gpu:
        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": engine != "deepspeed" and not has_gpu}


def check_supported(config: Config, engine: str) -> None:
    """Combinations the sharded engines do not support yet, refused before any work."""
    if engine not in ("fsdp", "deepspeed"):
        return
    name = "FSDP" if engine == "fsdp" else "DeepSpeed"
    problems = []
    if config.model.model_type == "lora":
        problems.append("--model_type=lora (LoRA adapters are small: train them with DDP, e.g. "
                        "examples/accelerate/multi_gpu.yaml or --num_processes N)")
    if config.train.use_ema:
        problems.append("--use_ema (the EMA copy would have to be sharded too; train without it, or use DDP)")
    if config.train.optimizer == "adamw8bit":
        problems.append("--optimizer=adamw8bit (its quantised state cannot be gathered; use adamw or adafactor)")
    if config.train.optimizer == "adamw_bf16":
        problems.append("--optimizer=adamw_bf16 (its bfloat16 weights and compensation buffers are not gathered "
                        f"by {name}; use adamw with --mixed_precision=bf16, or DDP)")
    if problems:
        raise UnsupportedFeatureError(f"{name} training does not support " + "; ".join(problems))


class Replicated:
    """One process, or DDP: every process holds the whole UNet and optimizer."""

    layout = "torch"
    sharded = False
    loss_scale = 1.0  # factor on each micro-batch's loss before backward

    def __init__(self, unet: torch.nn.Module, optimizer: Any, is_main: bool = True) -> None:
        self.unet = unet
        self.optimizer = optimizer
        self.is_main = is_main

    def _trained_names(self) -> set[str] | None:
        """Names of the trained parameters when only part of the UNet trains (LoRA adapters), else None."""
        named = dict(self.unet.named_parameters())
        trained = {name for name, p in named.items() if p.requires_grad}
        return None if len(trained) == len(named) else trained

    def snapshot(self) -> Snapshot:
        """The weights that train (all of them, or only the LoRA adapters: the frozen base is the pretrained
        model, which the run identity pins) and the optimizer state."""
        if not self.is_main:
            return Snapshot()
        trained = self._trained_names()
        state = self.unet.state_dict()
        if trained is not None:
            state = {k: v for k, v in state.items() if k in trained}
        weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        return Snapshot(weights, self.optimizer.state_dict())

    def restore(self, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        trained = self._trained_names()
        if trained is None:
            self.unet.load_state_dict(weights, strict=True)
        else:
            if set(weights) != trained:
                raise ValueError(f"checkpoint holds {len(weights)} trained tensors, the model trains {len(trained)}")
            self.unet.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(optimizer_state)

    def whole_unet(self, device: torch.device | str | None = None) -> torch.nn.Module | None:
        return self.unet if self.is_main else None

    def input_dtype(self) -> torch.dtype | None:
        return None

    def micro_step(self, accelerator: Any, model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's forward and backward: gradients are reduced on the last one only."""
        return contextlib.nullcontext() if last else accelerator.no_sync(model)


def _materialise(unet: torch.nn.Module, weights: dict[str, torch.Tensor], device: Any) -> torch.nn.Module:
    """A plain copy of a (sharded) diffusers UNet holding the given full weights."""
    whole = type(unet).from_config(unet.config)
    whole.load_state_dict(weights, strict=True)
    return whole.to(device or "cpu").eval()


class FullySharded(Replicated):
    """FSDP (1 or 2): weights and optimizer state gathered to full tensors through torch's distributed
    state-dict API (`torch.distributed.checkpoint.state_dict`), optimizer state keyed by parameter name."""

    layout = "fsdp-full"
    sharded = True

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds the real one

    def snapshot(self) -> Snapshot:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.unet, options=options)
        optimizer_state = get_optimizer_state_dict(self.unet, self._torch_optimizer(), options=options)
        return Snapshot(weights, optimizer_state) if self.is_main else Snapshot()

    def restore(self, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.unet, weights, options=options)
        set_optimizer_state_dict(self.unet, self._torch_optimizer(), optimizer_state, options=options)

    def whole_unet(self, device: torch.device | str | None = None) -> torch.nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _materialise(self.unet, weights, device) if self.is_main else None


class DeepSpeedZero(Replicated):
    """DeepSpeed ZeRO stage 1, 2 or 3 through DeepSpeed's public per-parameter API (`deepspeed.utils.safe_*`):
    the fp32 master weights and each optimizer state tensor are gathered whole, keyed by parameter name, so a
    checkpoint does not depend on the number of processes. Scalar optimizer state (Adam's step) is shared by
    all partitions and kept once."""

    layout = "deepspeed-full"
    sharded = True

    def __init__(self, unet: torch.nn.Module, optimizer: Any, is_main: bool, zero_stage: int,
                 accumulation: int) -> None:
        super().__init__(unet, optimizer, is_main)
        self.zero_stage = zero_stage
        self.loss_scale = float(accumulation)  # DeepSpeed divides each micro-batch's loss by its accumulation

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.unet.named_parameters() if p.requires_grad]

    def _base_optimizer(self) -> torch.optim.Optimizer:
        zero = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wrapper → ZeRO optimizer
        return zero.optimizer  # ZeRO's wrapped torch optimizer, over flat partitions

    def _gather(self, read: Any) -> dict[str, torch.Tensor]:
        """`read(param)` for every trained parameter, whole, on the main process ({} elsewhere).

        Each call is a collective under ZeRO-3, so every rank walks the parameters in the same order."""
        gathered = {}
        for name, param in self._named():
            value = read(param)
            if self.is_main:
                gathered[name] = value.detach().contiguous().cpu()
        return gathered

    def _fp32_weights(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: value.float() for name, value in self._gather(safe_get_full_fp32_param).items()}

    def _state_keys(self) -> tuple[list[str], dict[str, Any]]:
        states = list(self._base_optimizer().state.values())
        if not states:
            return [], {}
        first = states[0]
        per_parameter = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in first.items() if k not in per_parameter}
        return per_parameter, scalars

    def snapshot(self) -> Snapshot:
        from deepspeed.utils import safe_get_full_optimizer_state

        keys, scalars = self._state_keys()
        weights = self._fp32_weights()
        per_parameter = {key: self._gather(lambda param, key=key: safe_get_full_optimizer_state(param, key))
                         for key in keys}
        if not self.is_main:
            return Snapshot()
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self._base_optimizer().param_groups]
        return Snapshot(weights, {"per_parameter": per_parameter, "scalars": scalars, "param_groups": groups,
                                  "zero_stage": self.zero_stage})

    def restore(self, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        named = self._named()
        missing = sorted({name for name, _ in named} - set(weights))
        if missing:
            raise ConfigError(f"the checkpoint lacks weights for {len(missing)} parameters (first: {missing[0]})")
        self._initialise_optimizer_state()
        keys, _ = self._state_keys()
        saved = optimizer_state["per_parameter"]
        if sorted(saved) != sorted(keys):
            raise ConfigError(f"the checkpoint's optimizer state holds {sorted(saved)}, this optimizer "
                              f"{sorted(keys)}: resume with the same --optimizer")
        for name, param in named:
            safe_set_full_fp32_param(param, weights[name])
            for key in keys:
                safe_set_full_optimizer_state(param, saved[key][name], key)
        with self._writable([p for _, p in named]):
            for name, param in named:
                param.data.copy_(weights[name].to(param.dtype))  # the working copy the forward pass uses
        base = self._base_optimizer()
        for state in base.state.values():
            for key, value in optimizer_state["scalars"].items():
                state[key] = torch.tensor(value, dtype=state[key].dtype) if torch.is_tensor(state.get(key)) else value
        for group, saved_group in zip(base.param_groups, optimizer_state["param_groups"], strict=True):
            group.update(saved_group)

    def _initialise_optimizer_state(self) -> None:
        """ZeRO's optimizer creates its state at the first step. Before a restore, take one step that moves
        nothing (zero gradients, learning rate 0) so the checkpoint's values have somewhere to go."""
        base = self._base_optimizer()
        if base.state:
            return
        rates = []
        for group in base.param_groups:
            rates.append(group["lr"])
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        base.step()
        for group, rate in zip(base.param_groups, rates, strict=True):
            group["lr"] = rate
            for param in group["params"]:
                param.grad = None
        zero = getattr(self.optimizer, "optimizer", self.optimizer)
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2 link it after a first step
        if link is not None:
            link()

    @contextlib.contextmanager
    def _writable(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        if self.zero_stage == 3:  # partitioned: gather, write, and re-partition what rank 0 holds
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                yield
        else:
            yield

    def whole_unet(self, device: torch.device | str | None = None) -> torch.nn.Module | None:
        weights = self._fp32_weights()
        return _materialise(self.unet, weights, device) if self.is_main else None

    def input_dtype(self) -> torch.dtype | None:
        return next(self.unet.parameters()).dtype  # DeepSpeed casts the module itself to bf16/fp16

    def micro_step(self, accelerator: Any, model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        # accumulate() tells DeepSpeed where the accumulation boundary is; its engine steps there itself.
        return accelerator.accumulate(model)


@contextlib.contextmanager
def whole_model_loading(accelerator: Any) -> Iterator[None]:
    """Context for loading models whole on every process.

    accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and under ZeRO-3
    transformers then partitions every model as it loads (zero.Init): the frozen text encoders would be unusable
    on one rank alone, and the UNet must reach `prepare()` whole. The registration is lifted while loading.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def strategy_for(accelerator: Any, unet: Any, optimizer: Any, accumulation: int) -> Replicated:
    """The strategy matching the engine accelerate prepared `unet` with."""
    kind = accelerator.distributed_type.value
    trained = accelerator.unwrap_model(unet)
    if kind == "FSDP":
        return FullySharded(trained, optimizer, accelerator.is_main_process)
    if kind == "DEEPSPEED":
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        return DeepSpeedZero(trained, optimizer, accelerator.is_main_process, stage, accumulation)
    return Replicated(trained, optimizer, accelerator.is_main_process)


def configure_deepspeed(accelerator: Any, config: Config) -> None:
    """Fill DeepSpeed's batch, accumulation and clipping settings from expertune's own flags before prepare().

    expertune builds the optimizer and LR schedule itself (--optimizer, --lr_scheduler); a DeepSpeed JSON config
    that declares its own is refused rather than silently overriding those flags.
    """
    plugin = accelerator.state.deepspeed_plugin
    settings = plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in settings:
            raise ConfigError(f"the DeepSpeed config declares an {section!r} section: remove it; expertune builds the "
                              "optimizer and LR schedule from --optimizer and --lr_scheduler")
    t = config.train
    settings["train_micro_batch_size_per_gpu"] = t.train_batch_size
    settings["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    settings["train_batch_size"] = t.train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    settings["gradient_clipping"] = float(t.max_grad_norm or 0.0)
    accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps
