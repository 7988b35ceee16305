"""Everything a run holds, built once before the first step: the run object and its per-expert state.

`setup_run(config)` goes, in order: accelerator and output directory → model components → noise schedule
and expert band → validation plan (refuses a bad peer in seconds) → data and caches → trainable UNet,
optimizer, LR schedule, engine strategy, EMA → resume from a checkpoint → metrics, trackers, validator.

What belongs to one expert (its band, UNet, optimizer, EMA, data position, validator) lives in `ExpertRun`,
what the whole job shares (accelerator, components, data, schedule, metrics) in `Run`, so a job that trains
several experts holds several `ExpertRun`s and nothing else changes shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from expertune.config import Config, required
from expertune.config.schema import FIELDS
from expertune.data.batches import Bucket, MicroBatch, batches_per_epoch, epoch_batches, micro_batches
from expertune.prepare import PreparedData, prepare_data
from expertune.errors import ConfigError
from expertune.mixture import expert_sources, per_expert, plan_bands, step_owners, steps_per_expert
from expertune.experts import ExpertBand, band_from_settings
from expertune.models.lora import add_lora_adapters
from expertune.models.sdxl import SDXLComponents, load_components
from expertune.schedule import NoiseSchedule
from expertune.train.checkpoint import (
    DataPosition,
    TrainingState,
    check_resume_compatible,
    load_checkpoint,
    read_checkpoint_document,
    remove_partial_checkpoints,
    resolve_checkpoint,
    resume_requested,
)
from expertune.train import device as device_settings
from expertune.train.ema import ExponentialMovingAverage
from expertune.train.metrics import MetricsLog, truncate_metrics
from expertune.train.optim import build_lr_scheduler, build_optimizer
from expertune.train.trackers import init_trackers, log_with
from expertune.objective.weighting import WeightTable, resolve_weighting
from expertune.train.outputs import check_output_dir, run_identity
from expertune.train.runtime import has_accelerator, tracker_config
from expertune.train.strategy import (
    Replicated,
    accelerator_options,
    check_supported,
    configure_deepspeed,
    engine_requested,
    strategy_for,
    whole_model_loading,
)
from expertune.validate.plan import ValidationPlan

log = logging.getLogger(__name__)


def noise_schedule_for(config: Config, scheduler_config: dict[str, Any]) -> NoiseSchedule:
    s = config.schedule
    return NoiseSchedule.from_scheduler_config(
        scheduler_config,
        prediction_type=s.prediction_type,
        rescale_betas_zero_snr=True if s.rescale_betas_zero_snr else None,
        training_timestep_spacing=s.training_scheduler_timestep_spacing,
        inference_timestep_spacing=s.inference_scheduler_timestep_spacing,
    )


def expert_band_for(config: Config, num_train_timesteps: int) -> ExpertBand:
    b = config.band
    try:
        return band_from_settings(
            num_train_timesteps,
            refiner_training=b.refiner_training,
            refiner_training_strength=b.refiner_training_strength,
            refiner_training_invert_schedule=b.refiner_training_invert_schedule,
            timestep_range=b.timestep_range,
        )
    except ValueError as error:
        raise ConfigError(f"expert band: {error}") from None


def expert_bands_for(config: Config, schedule: NoiseSchedule) -> list[ExpertBand]:
    """The bands this job trains, in chain order: the mixture plan's, or the one band of a single expert."""
    plan = config.mixture.mixture_boundaries
    if plan is None:
        return [expert_band_for(config, schedule.num_train_timesteps)]
    try:
        return plan_bands(plan, schedule.alphas_cumprod)
    except ValueError as error:
        raise ConfigError(f"mixture plan: {error}") from None


def expert_config(config: Config, index: int, count: int) -> Config:
    """`config` as expert `index` of `count` sees it: the per-expert learning rate, loss weighting and EMA
    decay of a mixture (`expert_*` options) in place of the shared ones."""
    mix, t = config.mixture, config.train
    if count == 1 and config.mixture.mixture_boundaries is None:
        return config
    weightings = FIELDS["loss_weighting"].choices or ()

    def weighting(text: str) -> str | None:
        if text in ("", "default"):
            return None
        if text not in weightings:
            raise ValueError(f"not one of: {', '.join(weightings)}")
        if text == "min_snr" and t.snr_gamma is None:
            raise ValueError("min_snr needs --snr_gamma")
        return text

    try:
        lr = per_expert(mix.expert_learning_rates, count, "expert_learning_rates", _positive, t.learning_rate)
        loss = per_expert(mix.expert_loss_weightings, count, "expert_loss_weightings", weighting, t.loss_weighting)
        decay = per_expert(mix.expert_ema_decays, count, "expert_ema_decays", _unit_interval, t.ema_decay)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if mix.expert_ema_decays is not None and not t.use_ema:
        raise ConfigError(f"expert_ema_decays={mix.expert_ema_decays!r} needs --use_ema")
    train = replace(t, learning_rate=lr[index], loss_weighting=loss[index], ema_decay=decay[index])
    return replace(config, train=train)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError("must be in (0, 1)")
    return value


def total_optimizer_steps(config: Config, buckets: int | Sequence[Bucket], world_size: int) -> int:
    t = config.train
    if t.max_train_steps:
        return int(t.max_train_steps)
    epochs = t.num_train_epochs or 1
    micro = batches_per_epoch(buckets, t.train_batch_size, world_size) * epochs
    return max(1, -(-micro // t.gradient_accumulation_steps))


@dataclass
class ExpertRun:
    """One expert being trained: its band, weights, optimizer, EMA, data position and validator."""

    index: int  # place in the chain (0: the expert that starts from pure noise)
    band: ExpertBand
    plan: ValidationPlan
    unet: Any  # as accelerate prepared it (what forward/backward and clipping see)
    optimizer: Any
    lr_scheduler: Any
    strategy: Replicated  # how the UNet is spread over processes
    ema: ExponentialMovingAverage | None
    state: TrainingState  # what a checkpoint captures
    stream: Iterator[MicroBatch] | None = None
    validator: Any = None  # validate.samples.Validator, made once the metrics log exists
    last_record: dict[str, Any] = field(default_factory=dict)
    layout_epoch: int | None = None  # the epoch whose order `state.epoch_order` holds
    weights: WeightTable | None = None  # the expert's loss weighting over the schedule (objective/weighting.py)
    bf16_weights: bool = False  # the UNet is held in bfloat16 (optimizer=adamw_bf16)
    config: Config | None = None  # the run's config as this expert sees it (`expert_config`)
    total_steps: int = 0  # this expert's own optimizer steps in the job
    components: SDXLComponents | None = None  # a mixture expert's own model (`expert_models`); None: the run's
    prepared: PreparedData | None = None  # the run's data with that model's text embeddings and time ids

    @property
    def trained(self) -> torch.nn.Module:
        """The UNet module itself (unwrapped by the strategy): what is exported."""
        return self.strategy.unet

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trained.parameters() if p.requires_grad]


@dataclass
class Run:
    """What the whole job shares; `experts` are the experts it trains, in chain order (one, or a mixture)."""

    config: Config
    accelerator: Any
    output_dir: Path
    components: SDXLComponents
    schedule: NoiseSchedule
    prepared: PreparedData
    identity: dict[str, Any]
    total_steps: int
    config_snapshot: dict[str, Any]
    checkpoint_path: Path | None
    metrics: MetricsLog
    experts: list[ExpertRun]
    started: float
    owners: list[int] = field(default_factory=list)  # the expert of each job step (a mixture; mixture.py)
    first_step_at: float | None = None

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def is_mixture(self) -> bool:
        return self.config.mixture.mixture_boundaries is not None

    @property
    def expert(self) -> ExpertRun:
        """The one expert of a single-expert job."""
        assert len(self.experts) == 1, "a mixture job has several experts: use run.experts"
        return self.experts[0]

    @property
    def step(self) -> int:
        """Job steps done: each trains exactly one expert, so the sum of the experts' own steps."""
        return sum(expert.state.step for expert in self.experts)

    def components_of(self, expert: ExpertRun) -> SDXLComponents:
        return expert.components or self.components

    def data_of(self, expert: ExpertRun) -> PreparedData:
        return expert.prepared or self.prepared

    def next_expert(self) -> ExpertRun:
        """The expert that trains the next job step."""
        return self.experts[self.owners[self.step]] if self.owners else self.experts[0]

    def epoch_layout(self, epoch: int) -> list[int]:
        return epoch_layout(self.config, self.prepared, self.accelerator.num_processes, epoch)

    def stream_after(self, consumed: int) -> Iterator[MicroBatch]:
        """The run's micro-batch stream, advanced past the `consumed` micro-batches of earlier steps."""
        t = self.config.train
        stream = micro_batches(self.prepared.buckets, t.train_batch_size, t.seed,
                               rank=self.accelerator.process_index, world_size=self.accelerator.num_processes)
        for _ in range(consumed):
            next(stream)
        return stream


def epoch_layout(config: Config, prepared: PreparedData, world_size: int, epoch: int) -> list[int]:
    """The epoch's order of items (its global batches, flattened): what a checkpoint records and checks."""
    t = config.train
    batches = epoch_batches(prepared.buckets, t.train_batch_size * world_size, t.seed, epoch, world_size=world_size)
    return [index for batch in batches for index in batch]


def make_accelerator(config: Config) -> Any:
    """accelerate's Accelerator for this run (engine from the accelerate config, precision, trackers)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(required(config.train.output_dir, "output_dir"))
    logging_dir = Path(config.logging.logging_dir) if config.logging.logging_dir else output_dir / "logs"
    # accelerate keeps process-wide state; a second run in one process (the demo, a notebook) may use other
    # precision settings. The process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    check_supported(config, engine_requested() or "ddp")
    return Accelerator(
        # DDP on CPUs: cpu=True makes several processes a gloo group (MULTI_CPU); DeepSpeed and FSDP: see strategy
        **accelerator_options(has_accelerator()),
        mixed_precision=config.model.mixed_precision,
        log_with=log_with(config, logging_dir),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )


def _trainable_unet(config: Config, unet: Any) -> Any:
    """The UNet in training mode with the parameters this run trains (all of them, or LoRA adapters)."""
    unet.train()
    m = config.model
    if m.model_type == "lora":
        count = add_lora_adapters(unet, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
        log.info("training LoRA adapters (rank %d): %.2fM parameters", m.lora_rank, count / 1e6)
    else:
        unet.requires_grad_(True)
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def _device_settings(config: Config, accelerator: Any, unet: Any) -> bool:
    """bf16 weights for adamw_bf16, TF32, the slow-bf16 warning and torch.compile; True when weights are bf16."""
    m = config.model
    bf16_weights = device_settings.hold_weights_in_bf16(unet, config.train.optimizer)
    device_settings.apply_tf32(m.allow_tf32, accelerator.device)
    device_settings.warn_if_bf16_is_slow(m.mixed_precision, accelerator.device)
    device_settings.compile_unet(unet, m.dynamo_backend, accelerator.device)
    return bf16_weights


def build_expert(config: Config, accelerator: Any, unet: Any, band: ExpertBand, plan: ValidationPlan,
                 total_steps: int, weights: WeightTable, index: int = 0) -> ExpertRun:
    """The expert's trainable UNet, optimizer, LR schedule and EMA, prepared by accelerate; state at step 0."""
    t = config.train
    unet = _trainable_unet(config, unet)
    bf16_weights = _device_settings(config, accelerator, unet)
    optimizer = build_optimizer(unet.parameters(), t)
    lr_scheduler = build_lr_scheduler(optimizer, t, total_steps, processes=accelerator.num_processes)
    if accelerator.distributed_type.value == "DEEPSPEED":
        configure_deepspeed(accelerator, config)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    strategy = strategy_for(accelerator, unet, optimizer, t.gradient_accumulation_steps)
    log.info("engine: %s (%d processes)", accelerator.distributed_type.value, accelerator.num_processes)
    ema = None
    if t.use_ema:
        trainable = [p for p in strategy.unet.parameters() if p.requires_grad]
        ema = ExponentialMovingAverage(trainable, t.ema_decay, "cpu" if t.ema_device == "cpu" else accelerator.device)
    # One generator, the same on every rank: each rank draws the whole global batch's timesteps, noise and
    # caption dropout and takes its own slice (see StepRandomness), so results do not depend on world size.
    generator = torch.Generator().manual_seed(t.seed)
    state = TrainingState(step=0, data=DataPosition(0, 0, 0), unet=strategy.unet, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, generator=generator, epoch_order=[], ema=ema,
                          strategy=strategy)
    return ExpertRun(index, band, plan, unet, optimizer, lr_scheduler, strategy, ema, state, weights=weights,
                     bf16_weights=bf16_weights, config=config, total_steps=total_steps)


def resume(config: Config, path: Path, states: list[TrainingState], *, snapshot: dict[str, Any],
           identity: dict[str, Any], prepared: PreparedData, world_size: int) -> None:
    """Restore every expert's state from the checkpoint at `path`, refusing one that does not match this run."""
    document = read_checkpoint_document(path)
    check_resume_compatible(document, snapshot, identity, config.train.allow_config_change, path)
    load_checkpoint(path, states)
    for state in states:
        if state.epoch_order and state.epoch_order != epoch_layout(config, prepared, world_size, state.data.epoch):
            raise ConfigError(f"the data order stored in {path} does not match the datasets any more")
    log.info("resumed from %s at step %d (epoch %d)", path, sum(s.step for s in states), states[0].data.epoch)


def loss_weights(config: Config, schedule: NoiseSchedule, band: ExpertBand) -> WeightTable:
    """The expert's loss weighting, logged with its mean over the band; a warning when it starves the band."""
    t = config.train
    weights = WeightTable.build(schedule.alphas_cumprod, resolve_weighting(t.loss_weighting, t.snr_gamma),
                                schedule.prediction_type, t.snr_gamma)
    summary = weights.band_summary(band.lo, band.hi)
    log.info("loss weighting %s: mean weight %.4g over the band (min %.4g, max %.4g)", weights.weighting,
             summary["mean"], summary["min"], summary["max"])
    if (starved := weights.starvation(band.lo, band.hi)) is not None:
        log.warning(starved)
    return weights


def _under_autocast(run: Any, accelerator: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with accelerator.autocast():
            return run(*args, **kwargs)
    return wrapped


def setup_run(config: Config) -> Run:
    """Build the run `config` describes, resumed when it asks to be; every process calls this."""
    from expertune.validate.plan import build_plan

    config.require_for_training()
    started = time.monotonic()
    t = config.train
    output_dir = Path(required(t.output_dir, "output_dir"))
    accelerator = make_accelerator(config)
    resuming = resume_requested(output_dir, t.resume_from_checkpoint)  # `latest` with none yet: a fresh run
    check_output_dir(output_dir, overwrite=t.overwrite_output_dir, resuming=resuming,
                     main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # no process looks at output_dir while the main one clears it
    checkpoint_path = (resolve_checkpoint(output_dir, required(t.resume_from_checkpoint, "resume_from_checkpoint"))
                       if resuming else None)
    torch.manual_seed(t.seed)
    convert_single_files(config, accelerator)
    with whole_model_loading(accelerator):  # ZeRO-3 must not partition the frozen models nor the UNet yet
        m = config.model
        components = load_components(required(m.pretrained_model_name_or_path, "pretrained_model_name_or_path"),
                                     revision=m.revision, variant=m.variant, single_file_config=m.single_file_config,
                                     cache_dir=config.resolved_cache_dir())
    schedule = noise_schedule_for(config, components.scheduler_config)
    for warning in schedule.warnings():
        log.warning(warning)
    bands = expert_bands_for(config, schedule)
    if len(bands) > 1:
        check_mixture_engine(config, accelerator)
    log.info("expert band%s %s of %d timesteps, prediction_type=%s, zero-terminal SNR=%s",
             "s" if len(bands) > 1 else "", ", ".join(map(str, bands)), schedule.num_train_timesteps,
             schedule.prediction_type, schedule.rescale_betas_zero_snr)
    configs = [expert_config(config, k, len(bands)) for k in range(len(bands))]
    weights = [loss_weights(c, schedule, band) for c, band in zip(configs, bands)]
    with whole_model_loading(accelerator):  # refuses a bad peer early
        plans = [build_plan(config, band, schedule, output_dir, device=accelerator.device) for band in bands]
    for frozen in components.frozen_modules():  # (no text encoder 1 in the SDXL refiner layout)
        frozen.to(accelerator.device)
    models = expert_components(config, components, bands, accelerator)
    prompts = [p for plan in plans for p in plan.prompts_to_cache]
    with accelerator.main_process_first():  # rank 0 fills the caches; the others then find every entry
        prepared = prepare_data(config, components, extra_prompts=prompts)
        views = expert_data(config, prepared, components, models, prompts, accelerator.device)
    for model in {id(m): m for m in [components, *models]}.values():
        model.release_text_encoders()
    total_steps = total_optimizer_steps(config, prepared.buckets, accelerator.num_processes)
    mix = config.mixture
    owners = (step_owners(mix.mixture_schedule, bands, total_steps, switch_every=mix.mixture_switch_every, seed=t.seed)
              if len(bands) > 1 else [])
    shares = steps_per_expert(owners, len(bands)) if owners else [total_steps]
    experts = [build_expert(c, accelerator, unet, band, plan, share, w, index=k)
               for k, (c, unet, band, plan, share, w) in enumerate(zip(configs, expert_unets(models), bands, plans,
                                                                       shares, weights))]
    for expert, model, view in zip(experts, models, views):
        if model is not components:
            expert.components, expert.prepared = model, view
    identity, snapshot = run_identity(prepared, components.source), config.to_dict()
    if checkpoint_path is not None:
        resume(config, checkpoint_path, [e.state for e in experts], snapshot=snapshot, identity=identity,
               prepared=prepared, world_size=accelerator.num_processes)
    job_step = sum(e.state.step for e in experts)
    if accelerator.is_main_process:
        truncate_metrics(output_dir / "metrics.jsonl", job_step)
        remove_partial_checkpoints(output_dir)
    if accelerator.is_main_process and config.logging.report_to != "none":
        init_trackers(accelerator, config, tracker_config(config))
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    run = Run(config, accelerator, output_dir, components, schedule, prepared, identity, total_steps, snapshot,
              checkpoint_path, metrics, experts, started, owners=owners)
    for expert in experts:
        attach_validator(run, expert)
        expert.stream = run.stream_after(expert.state.data.micro_batches_consumed)
        expert.layout_epoch = expert.state.data.epoch if expert.state.epoch_order else None
    if len(experts) > 1:
        log.info("mixture of %d experts, schedule %s: steps per expert %s", len(experts), mix.mixture_schedule,
                 ", ".join(str(s) for s in shares))
    return run


def convert_single_files(config: Config, accelerator: Any) -> None:
    """Single-file checkpoints among the run's models are converted by the main process first (issue 19); the
    other processes then find the converted folders instead of writing them too."""
    from expertune.prepare import expert_model_sources
    from expertune.models.sdxl import model_folder
    from expertune.models.single_file_in import is_single_file

    main = config.model.pretrained_model_name_or_path or ""
    sources = [main, *(source for _, source in expert_model_sources(config, main))]
    if not any(is_single_file(source) for source in sources):
        return
    with accelerator.main_process_first():
        for source in sources:
            model_folder(source, single_file_config=config.model.single_file_config,
                         cache_dir=config.resolved_cache_dir())


def attach_validator(run: Run, expert: ExpertRun) -> None:
    """The expert's validator (its images in a folder and metrics under keys of its own in a mixture)."""
    from expertune.validate.samples import Validator

    expert.validator = Validator(expert.config or run.config, expert.plan, run.components_of(expert), run.schedule,
                                 expert.band, run.data_of(expert), run.accelerator, run.output_dir, run.metrics,
                                 expert_index=expert.index if run.is_mixture else None)
    if expert.bf16_weights:  # the pipelines feed float32 latents: autocast casts them for the bfloat16 UNet
        expert.validator.run = _under_autocast(expert.validator.run, run.accelerator)


def check_mixture_engine(config: Config, accelerator: Any) -> None:
    """A joint job trains several UNets: DDP (or one process) only; offloading only with one process."""
    engine = accelerator.distributed_type.value
    if engine in ("DEEPSPEED", "FSDP"):
        raise ConfigError(f"mixture_boundaries={config.mixture.mixture_boundaries!r}: a joint job of several experts "
                          f"runs under DDP or in one process, not {engine}; train each expert in its own job "
                          "(--timestep_range) under that engine, or use a DDP accelerate config")
    if config.mixture.mixture_offload_inactive and accelerator.num_processes > 1:
        raise ConfigError("mixture_offload_inactive moves experts between devices, which a DDP-wrapped UNet does "
                          "not allow: use it with one process, or turn it off")


def expert_components(config: Config, components: SDXLComponents, bands: list[ExpertBand],
                      accelerator: Any) -> list[SDXLComponents]:
    """The model each expert starts from: its `expert_models` entry (loaded once per distinct model, its frozen
    modules on the device for caching), else the run's. A model of the SDXL refiner layout cannot own the band
    that starts from pure noise."""
    if len(bands) == 1:
        return [components]
    mix = config.mixture
    assert mix.mixture_boundaries is not None  # several bands come from a plan
    try:
        sources = expert_sources(mix.mixture_boundaries, mix.expert_models, components.source)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    loaded = {components.source: components}
    result = []
    for k, (source, band) in enumerate(zip(sources, bands)):
        if source not in loaded:
            with whole_model_loading(accelerator):
                loaded[source] = load_components(source, revision=config.model.revision, variant=config.model.variant,
                                                 single_file_config=config.model.single_file_config,
                                                 cache_dir=config.resolved_cache_dir())
            for frozen in loaded[source].frozen_modules():
                frozen.to(accelerator.device)
            log.info("expert %d starts from %s (%s layout)", k, source, loaded[source].layout_kind)
        model = loaded[source]
        if model.is_refiner and band.holds_start:
            raise ConfigError(f"expert_models entry {k} ({source}) has the SDXL refiner layout, and expert {k} owns "
                              f"{band}, which starts from pure noise: a refiner only continues a chain. Give that band "
                              "a base-layout model (the refiner usually takes the last, low-noise band)")
        result.append(model)
    return result


def expert_data(config: Config, prepared: PreparedData, components: SDXLComponents, models: list[SDXLComponents],
                prompts: list[str], device: Any) -> list[PreparedData]:
    """Each expert's view of the run's data: the run's own, or (another model) the same items and shared latents
    with that model's text embeddings and time ids (`prepared_for_model`, which refuses another VAE)."""
    from expertune.prepare import prepared_for_model

    views: dict[int, PreparedData] = {id(components): prepared}
    for k, model in enumerate(models):
        if id(model) not in views:
            views[id(model)] = prepared_for_model(prepared, config, model, name=f"expert_models entry {k}",
                                                  extra_prompts=prompts)
    return [views[id(model)] for model in models]


def expert_unets(models: list[SDXLComponents]) -> list[Any]:
    """Each expert's starting UNet: the first expert of a model takes that model's UNet, later ones a copy."""
    import copy

    taken: set[int] = set()
    unets = []
    for model in models:
        unets.append(copy.deepcopy(model.unet) if id(model) in taken else model.unet)
        taken.add(id(model))
    return unets
