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
from expertune.config.plan import ExpertSettings, MixturePlan
from expertune.data.batches import Bucket, MicroBatch, batches_per_epoch, epoch_batches, micro_batches
from expertune.prepare import PreparedData, prepare_data
from expertune.errors import ConfigError
from expertune.mixture import steps_per_expert
from expertune.experts import ExpertBand, band_from_settings
from expertune.models.adapters import adapter_spec
from expertune.models.lora import add_adapters
from expertune.models.quantize import quantize_frozen_base
from expertune.models.sdxl import SDXLComponents, load_components
from expertune.run_folder import RunLock
from expertune.schedule import NoiseSchedule
from expertune.train.checkpoint import (
    DataPosition,
    TrainingState,
    load_checkpoint,
    read_checkpoint_document,
    record_lineage,
    remove_partial_checkpoints,
    resolve_checkpoint,
    resume_requested,
)
from expertune.train import device as device_settings
from expertune.train.branch import SharedStart, become_expert
from expertune.train.ema import ExponentialMovingAverage
from expertune.train.resume_check import check_resume_compatible
from expertune.train.metrics import MetricsLog, truncate_metrics
from expertune.train.fused import StepInBackward
from expertune.train.knobs import check_distribution
from expertune.train.optim import build_lr_scheduler, build_optimizer
from expertune.train.trackers import init_trackers, log_with
from expertune.objective.weighting import WeightTable, resolve_weighting
from expertune.train.outputs import check_output_dir, lock_output_dir, run_identity
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
    plan = config.mixture_plan
    if plan is None:
        return [expert_band_for(config, schedule.num_train_timesteps)]
    return plan.bands(schedule.alphas_cumprod)


def expert_settings(config: Config, count: int) -> list[ExpertSettings]:
    """Each expert's resolved settings: the mixture plan's, or the shared options for a single expert."""
    plan = config.mixture_plan
    if plan is None:
        return [ExpertSettings.shared(config.flat())] * count
    return list(plan.experts)


def total_optimizer_steps(config: Config, buckets: int | Sequence[Bucket], world_size: int) -> int:
    t = config.train
    if t.max_train_steps:
        return int(t.max_train_steps)
    epochs = t.num_train_epochs or 1
    micro = batches_per_epoch(buckets, t.train_batch_size, world_size) * epochs
    return max(1, -(-micro // t.gradient_accumulation_steps))


@dataclass(kw_only=True)
class ExpertRun:
    """One expert being trained: its band, resolved settings, model and data, weights, optimizer, EMA, data
    position and validator."""

    index: int  # place in the chain (0: the expert that starts from pure noise)
    band: ExpertBand
    training_band: ExpertBand  # where its timesteps are drawn: the band, widened by --mixture_overlap
    settings: ExpertSettings  # its learning rate, loss weighting, EMA decay and model (config/plan.py)
    plan: ValidationPlan
    components: SDXLComponents  # the model it started from (the run's, or its `expert_models` entry)
    prepared: PreparedData  # the run's data with that model's text embeddings and time ids
    unet: Any  # as accelerate prepared it (what forward/backward and clipping see)
    optimizer: Any
    lr_scheduler: Any
    strategy: Replicated  # how the UNet is spread over processes
    ema: ExponentialMovingAverage | None
    state: TrainingState  # what a checkpoint captures
    weights: WeightTable  # the expert's loss weighting over the schedule (objective/weighting.py)
    total_steps: int  # this expert's own optimizer steps in the job
    bf16_weights: bool = False  # the UNet is held in bfloat16 (optimizer=adamw_bf16)
    stream: Iterator[MicroBatch] | None = None
    validator: Any = None  # validate.samples.Validator, made once the metrics log exists
    last_record: dict[str, Any] = field(default_factory=dict)
    layout_epoch: int | None = None  # the epoch whose order `state.epoch_order` holds

    @property
    def trained(self) -> torch.nn.Module:
        """The UNet module itself (unwrapped by the strategy): what is exported."""
        return self.strategy.unet

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trained.parameters() if p.requires_grad]


@dataclass(kw_only=True)
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
    plan: MixturePlan | None = None  # the mixture plan (config/plan.py); None for a single expert
    owners: list[int] = field(default_factory=list)  # the expert of each job step (a mixture; mixture.py)
    shared: SharedStart | None = None  # a shared start before the split (train/branch.py)
    first_step_at: float | None = None
    lock: RunLock = field(default_factory=lambda: RunLock(Path(".")))  # held (main process) while the run lasts
    nonfinite_streak: int = 0  # updates skipped in a row for a non-finite loss or gradient norm

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def is_mixture(self) -> bool:
        return self.plan is not None

    @property
    def expert(self) -> ExpertRun:
        """The one expert of a single-expert job."""
        assert len(self.experts) == 1, "a mixture job has several experts: use run.experts"
        return self.experts[0]

    @property
    def step(self) -> int:
        """Job steps done: each trains exactly one expert, so the sum of the experts' own steps."""
        return sum(expert.state.step for expert in self.experts)

    def own_band(self, expert: ExpertRun) -> ExpertBand:
        """The band the expert is saved and validated with: its own, also while expert 0 is the shared start's trunk."""
        return self.shared.band if self.shared is not None and expert.index == 0 else expert.band

    def config_of(self, expert: ExpertRun) -> Config:
        """The run's config with the expert's own settings applied (`ExpertSettings.applied_to`): what its
        training knobs (loss type, timestep distribution, perturbation, masks; train/knobs.py) are read from."""
        return replace(self.config, train=expert.settings.applied_to(self.config.train))

    def widened_band(self, expert: ExpertRun) -> ExpertBand | None:
        """The band the expert trains on when an overlap widens its own (expert.json's training_timestep_range)."""
        plan = self.plan
        if plan is None or plan.overlap is None:
            return None
        return plan.training_bands(self.schedule.alphas_cumprod)[expert.index]

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
        quantize_frozen_base(unet, m.base_model_precision)  # issue 23: int8 base under the adapters
        spec = adapter_spec(m)  # issue 23: LoRA, DoRA, LoHa, LoKr
        count = add_adapters(unet, spec)
        log.info("training %s adapters (rank %d): %.2fM parameters", spec.describe()["adapter"], spec.rank,
                 count / 1e6)
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


def build_expert(config: Config, accelerator: Any, unet: Any, *, index: int, band: ExpertBand,
                 training_band: ExpertBand, settings: ExpertSettings, plan: ValidationPlan, components: SDXLComponents, prepared: PreparedData,
                 total_steps: int, weights: WeightTable) -> ExpertRun:
    """The expert's trainable UNet, optimizer, LR schedule and EMA (with its own settings), prepared by accelerate;
    state at step 0."""
    t = settings.applied_to(config.train)
    unet = _trainable_unet(config, unet)
    bf16_weights = _device_settings(config, accelerator, unet)
    optimizer = (StepInBackward(unet.parameters(), lambda params: build_optimizer(params, t, accelerator.device))
                 if t.optimizer_release_gradients  # issue 23
                 else build_optimizer(unet.parameters(), t, accelerator.device))
    lr_scheduler = build_lr_scheduler(optimizer, t, total_steps, processes=accelerator.num_processes)
    if accelerator.distributed_type.value == "DEEPSPEED":
        configure_deepspeed(accelerator, config)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    strategy = strategy_for(accelerator, unet, optimizer, t.gradient_accumulation_steps)
    log.info("engine: %s (%d processes)", accelerator.distributed_type.value, accelerator.num_processes)
    ema = None
    if t.use_ema:
        trainable = [p for p in strategy.unet.parameters() if p.requires_grad]
        ema = ExponentialMovingAverage(trainable, settings.ema_decay,
                                       "cpu" if t.ema_device == "cpu" else accelerator.device)
    # One generator, the same on every rank: each rank draws the whole global batch's timesteps, noise and
    # caption dropout and takes its own slice (see StepRandomness), so results do not depend on world size.
    generator = torch.Generator().manual_seed(t.seed)
    state = TrainingState(step=0, data=DataPosition(0, 0, 0), unet=strategy.unet, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, generator=generator, epoch_order=[], ema=ema,
                          strategy=strategy)
    return ExpertRun(index=index, band=band, training_band=training_band, settings=settings, plan=plan, components=components, prepared=prepared,
                     unet=unet, optimizer=optimizer, lr_scheduler=lr_scheduler, strategy=strategy, ema=ema,
                     state=state, weights=weights, total_steps=total_steps, bf16_weights=bf16_weights)


def checkpoint_step(path: Path) -> int:
    """The job step a checkpoint was saved at."""
    return int(read_checkpoint_document(path)["step"])


def resume(config: Config, path: Path, states: list[TrainingState], *, snapshot: dict[str, Any],
           identity: dict[str, Any], prepared: PreparedData, world_size: int, scaler: Any | None = None) -> None:
    """Restore every expert's state (and the fp16 GradScaler's) from the checkpoint at `path`, refusing one that
    does not match this run."""
    document = read_checkpoint_document(path)
    check_resume_compatible(document, snapshot, identity, config.train.allow_config_change, path)
    load_checkpoint(path, states)
    if scaler is not None and document.get("grad_scaler"):
        scaler.load_state_dict(document["grad_scaler"])
    elif scaler is not None:
        log.warning("checkpoint %s holds no GradScaler state: the fp16 loss scale starts afresh", path)
    for state in states:
        if state.epoch_order and state.epoch_order != epoch_layout(config, prepared, world_size, state.data.epoch):
            raise ConfigError(f"the data order stored in {path} does not match the datasets any more")
    log.info("resumed from %s at step %d (epoch %d)", path, sum(s.step for s in states), states[0].data.epoch)


def loss_weights(config: Config, schedule: NoiseSchedule, band: ExpertBand, settings: ExpertSettings) -> WeightTable:
    """The expert's loss weighting, logged with its mean over the band; a warning when it starves the band."""
    t = config.train
    weights = WeightTable.build(schedule.alphas_cumprod, resolve_weighting(settings.loss_weighting, t.snr_gamma),
                                schedule.prediction_type, t.snr_gamma)
    summary = weights.band_summary(band.lo, band.hi)
    log.info("loss weighting %s: mean weight %.4g over the band (min %.4g, max %.4g)", weights.weighting,
             summary["mean"], summary["min"], summary["max"])
    if (starved := weights.starvation(band.lo, band.hi)) is not None:
        log.warning(starved)
    check_distribution(config, band)  # issue 23
    return weights


def setup_run(config: Config) -> Run:
    """Build the run `config` describes, resumed when it asks to be; every process calls this. The main process
    holds the output directory's lock (`run.lock`) from here on: release it when the run ends."""
    config.require_for_training()
    started = time.monotonic()
    output_dir = Path(required(config.train.output_dir, "output_dir"))
    accelerator = make_accelerator(config)
    lock = lock_output_dir(output_dir, accelerator)  # one job per output directory; leftovers of killed ones gone
    try:
        run = _build_run(config, accelerator, output_dir, started)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def _build_run(config: Config, accelerator: Any, output_dir: Path, started: float) -> Run:
    from expertune.validate.plan import build_plan

    t = config.train
    resuming = resume_requested(output_dir, t.resume_from_checkpoint)  # `latest` with none yet: a fresh run
    check_output_dir(output_dir, overwrite=t.overwrite_output_dir, resuming=resuming,
                     main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # no process looks at output_dir while the main one clears it
    checkpoint_path = (resolve_checkpoint(output_dir, required(t.resume_from_checkpoint, "resume_from_checkpoint"))
                       if resuming else None)
    torch.manual_seed(t.seed)
    convert_single_files(config, accelerator)
    plan = config.mixture_plan
    if plan is not None:  # where the boundaries fall, from the scheduler config alone: refused before any weights load
        alphas = noise_schedule_for(config, scheduler_config_of(config)).alphas_cumprod
        plan.training_bands(alphas)
        plan.check_blend(plan.bands(alphas))
    with whole_model_loading(accelerator):  # ZeRO-3 must not partition the frozen models nor the UNet yet
        m = config.model
        components = load_components(required(m.pretrained_model_name_or_path, "pretrained_model_name_or_path"),
                                     revision=m.revision, variant=m.variant, single_file_config=m.single_file_config,
                                     cache_dir=config.resolved_cache_dir())
    schedule = noise_schedule_for(config, components.scheduler_config)
    for warning in schedule.warnings():
        log.warning(warning)
    bands = expert_bands_for(config, schedule)
    training = plan.training_bands(schedule.alphas_cumprod) if plan is not None else bands
    if len(bands) > 1:
        check_mixture_engine(config, accelerator)
    log.info("expert band%s %s of %d timesteps, prediction_type=%s, zero-terminal SNR=%s",
             "s" if len(bands) > 1 else "", ", ".join(map(str, bands)), schedule.num_train_timesteps,
             schedule.prediction_type, schedule.rescale_betas_zero_snr)
    settings = expert_settings(config, len(bands))
    weights = [loss_weights(config, schedule, band, s) for s, band in zip(settings, bands)]
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
    shared_steps = plan.shared.resolve(total_steps) if plan is not None and plan.shared is not None else 0
    after = plan.owners(bands, total_steps - shared_steps, t.seed) if plan is not None else []
    owners = [0] * shared_steps + after  # the trunk is expert 0 during the shared phase (train/branch.py)
    shares = steps_per_expert(after, len(bands)) if owners else [total_steps]
    shared = None
    if shared_steps:  # expert 0 starts as the trunk: the union of the bands, the shared settings, S steps
        shared = SharedStart(shared_steps, bands[0], training[0], settings[0], weights[0], shares[0])
        trunk = ExpertSettings.shared(config.flat())
        full = ExpertBand.full(schedule.num_train_timesteps)
        bands, settings, training = [full, *bands[1:]], [trunk, *settings[1:]], [full, *training[1:]]
        weights, shares = [loss_weights(config, schedule, full, trunk), *weights[1:]], [shared_steps, *shares[1:]]
    experts = [build_expert(config, accelerator, unet, index=k, band=bands[k], training_band=training[k],
                            settings=settings[k], plan=plans[k],
                            components=models[k], prepared=views[k], total_steps=shares[k], weights=weights[k])
               for k, unet in enumerate(expert_unets(models))]
    identity, snapshot = run_identity(prepared, components.source), config.to_dict()
    if shared is not None and checkpoint_path is not None and checkpoint_step(checkpoint_path) > shared.steps:
        become_expert(experts[0], shared, shared.settings.applied_to(t), accelerator)  # resumed after the split
    if checkpoint_path is not None:
        resume(config, checkpoint_path, [e.state for e in experts], snapshot=snapshot, identity=identity,
               prepared=prepared, world_size=accelerator.num_processes, scaler=getattr(accelerator, "scaler", None))
    job_step = sum(e.state.step for e in experts)
    if accelerator.is_main_process:
        truncate_metrics(output_dir / "metrics.jsonl", job_step)
        remove_partial_checkpoints(output_dir)
        if checkpoint_path is not None:
            record_lineage(output_dir, checkpoint_path)
    if accelerator.is_main_process and config.logging.report_to != "none":
        init_trackers(accelerator, config, tracker_config(config))
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    run = Run(config=config, accelerator=accelerator, output_dir=output_dir, components=components, schedule=schedule,
              prepared=prepared, identity=identity, total_steps=total_steps, config_snapshot=snapshot,
              checkpoint_path=checkpoint_path, metrics=metrics, experts=experts, started=started, plan=plan,
              owners=owners, shared=shared)
    attach_validators(run)
    for expert in experts:
        expert.stream = run.stream_after(expert.state.data.micro_batches_consumed)
        expert.layout_epoch = expert.state.data.epoch if expert.state.epoch_order else None
    if len(experts) > 1:
        log.info("mixture of %d experts, schedule %s: steps per expert %s%s", len(experts),
                 config.mixture.mixture_schedule, ", ".join(str(s) for s in (shared and [shared.total_steps, *shares[1:]]
                                                                             or shares)),
                 f", after {shared.steps} shared steps" if shared else "")
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


def attach_validators(run: Run) -> None:
    """Each expert's validator (its images in a folder and metrics under keys of its own in a mixture); in a
    mixture the first expert's validator also draws the whole chain, through the others' validators."""
    from expertune.validate.samples import Validator

    made: list[Validator] = []
    for expert in reversed(run.experts):  # the later experts first: the first expert's validator chains them
        expert.validator = Validator(
            run.config, expert.plan, expert.components, run.schedule, run.own_band(expert), expert.prepared,
            run.accelerator, run.output_dir, run.metrics, expert_index=expert.index if run.is_mixture else None,
            chain=list(reversed(made)) if run.is_mixture and expert.index == 0 else (),
            autocast=expert.bf16_weights,  # bfloat16 weights: autocast casts the pipelines' float32 latents
            handoff_blend=run.plan.handoff_blend if run.plan is not None and expert.index == 0 else 0)
        made.append(expert.validator)


def scheduler_config_of(config: Config) -> dict[str, Any]:
    """The run's model's scheduler config, read without loading the model (to check the mixture plan first)."""
    from expertune.models.sdxl import model_folder, read_scheduler_config

    m = config.model
    source = required(m.pretrained_model_name_or_path, "pretrained_model_name_or_path")
    folder = model_folder(source, single_file_config=m.single_file_config, cache_dir=config.resolved_cache_dir())
    return read_scheduler_config(folder, revision=m.revision if folder == source else None)


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
    plan = config.mixture_plan
    assert plan is not None  # several bands come from a plan
    sources = plan.model_sources(config.model.pretrained_model_name_or_path, components.source)
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
        if model.is_refiner and plan.handoff_blend:
            raise ConfigError(f"mixture_handoff_blend={plan.handoff_blend}: expert_models entry {k} ({source}) has the "
                              "SDXL refiner layout, and a blended hand-off runs two experts on one stage's text "
                              "conditioning: drop mixture_handoff_blend, or give every expert a base-layout model")
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
