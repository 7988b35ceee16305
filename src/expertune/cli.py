"""The `expertune` command: train, cache, audit, generate, export, demo, world, tiny-model, tiny-clip."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from expertune.errors import ExpertuneError

if TYPE_CHECKING:
    from expertune.config import Config

log = logging.getLogger("expertune")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # diffusers passes huggingface_hub a deprecated argument on every config fetch: noise, not news.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)


# Libraries whose DEBUG lines carry request headers (botocore's wire log prints X-Amz-Security-Token): kept at
# INFO under -v unless EXPERTUNE_DEBUG_BOTO=1 asks for them by name (their secret values are still redacted).
WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
DEBUG_BOTO_VARIABLE = "EXPERTUNE_DEBUG_BOTO"


def _setup_logging(verbose: bool) -> None:
    from expertune.redaction import install_log_redaction

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    install_log_redaction()
    if os.environ.get(DEBUG_BOTO_VARIABLE, "") not in ("1", "true", "yes"):
        for name in WIRE_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        transformers_logging.disable_progress_bar()  # transformers' own bars; it switches the hub's off too
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # a first start downloads GBs: show it
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def _training_config(rest: list[str]) -> tuple[Config, list[str]]:
    """The config of `train` / `cache` (SimpleTuner's config file found when none is given), with a seed of -1
    drawn once (a resumed run keeps its checkpoint's); `rest` with that seed, for launched processes."""
    from pathlib import Path

    from expertune.config import load_config
    from expertune.config.sources import draw_seed

    config, _warnings = load_config(rest, find_config=True)
    if config.train.seed != -1:
        return config, rest
    kept = None
    if config.train.output_dir and config.train.resume_from_checkpoint:
        from expertune.train.checkpoint import read_checkpoint_document, resolve_checkpoint, resume_requested

        output = Path(config.train.output_dir).expanduser()
        if resume_requested(output, config.train.resume_from_checkpoint):
            checkpoint = resolve_checkpoint(output, config.train.resume_from_checkpoint)
            kept = int(read_checkpoint_document(checkpoint)["config"]["train"]["seed"])
    config = draw_seed(config, kept)
    return config, [*rest, f"--seed={config.train.seed}"]


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.train.accelerator_errors import accelerator_errors
    from expertune.train.launch import needs_launcher, relaunch

    config, rest = _training_config(rest)
    if needs_launcher(config):
        code = relaunch(config, rest)  # the group trains; this process uploads once, after it
        return _publish(config) if code == 0 and config.hub.push_to_hub else code
    from expertune.train.launch import LAUNCHED_MARKER
    from expertune.train.loop import train

    with accelerator_errors(config, "training"):
        result = train(config)
    print(f"expert {result.band} saved to {result.pipeline_dir}")
    # One upload per job: by the launching process above when this CLI launched the group, else by rank 0.
    uploads = LAUNCHED_MARKER not in os.environ and os.environ.get("RANK", "0") == "0"
    return _publish(config) if config.hub.push_to_hub and uploads else 0


def _publish(config: Config) -> int:
    """--push_to_hub, after the experts are saved: a failure (HubUploadError, exit 5) loses nothing."""
    from expertune.hub import publish_run

    print(f"uploaded to {publish_run(config)}")
    return 0


def _cmd_cache(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.data.buckets import format_size
    from expertune.io_utils import atomic_write_json
    from expertune.prepare import cache_only
    from expertune.train.accelerator_errors import accelerator_errors
    from expertune.validate.plan import prompt_texts

    config, _rest = _training_config(rest)
    with accelerator_errors(config, "building the caches"):
        prepared = cache_only(config, prompt_texts(config))
    stats = prepared.cache_stats
    print("cache: " + " ".join(f"{name}={value}" for name, value in stats.items()))
    for row in prepared.bucket_table:
        size = format_size((row["height"], row["width"]))
        print(f"bucket {row['dataset']} {size}: {row['images']} images, {row['samples']} samples per epoch")
    for entry in prepared.skipped:
        print(f"skipped {entry['path']}: {entry['reason']}")
    print(f"{len(prepared.unique_items)} images ready, {len(prepared.skipped)} skipped")
    if args.stats_json:
        atomic_write_json(args.stats_json, {
            "cache": stats, "buckets": prepared.bucket_table, "skipped_images": prepared.skipped,
            "samples_per_epoch": len(prepared.items),
        })
    return 0


def _cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    import tempfile
    from pathlib import Path

    from expertune.errors import ConfigError
    from expertune.export_run import expert_folders
    from expertune.infer.chain import mixture_expert_paths, resolve_device, resolve_dtype, save_images
    from expertune.infer.generate import load_chain, run_chain
    from expertune.infer.sources import base_expert, read_prompts

    device = resolve_device(args.device)
    if sum(map(bool, (args.expert, args.mixture, args.base))) != 1:
        raise ConfigError("generate needs the experts: --mixture DIR (a mixture's output directory), --expert once per "
                          "expert (or checkpoint), or --base MODEL (the untouched model alone)")
    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("generate needs --prompt TEXT (once, or once per expert) or --prompts FILE, not both")
    prompts = read_prompts(args.prompts) if args.prompts else {"": args.prompt}
    with tempfile.TemporaryDirectory(prefix="expertune-generate-") as scratch:
        if args.base:
            experts: list = [base_expert(args.base)]
        elif args.mixture:
            experts = mixture_expert_paths(args.mixture)
        else:
            experts = [folder for source in args.expert for folder in expert_folders(source, Path(scratch))]
        blend = args.handoff_blend
        if blend is None:  # a mixture's own window (mixture.json, --mixture_handoff_blend), else a hard hand-off
            from expertune.expert_format import MixtureDescription

            blend = MixtureDescription.read(args.mixture).handoff_blend if args.mixture else 0
        loaded = load_chain(experts, guidance_scale=args.guidance or [7.5],
                            guidance_rescale=args.guidance_rescale or [0.0], scheduler=args.scheduler, device=device,
                            dtype=resolve_dtype(args.dtype, device), aesthetic_score=args.aesthetic_score,
                            negative_aesthetic_score=args.negative_aesthetic_score, cpu_offload=args.cpu_offload)
        for name, prompt in prompts.items():
            images = run_chain(loaded, prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                               num_images=args.num_images, seed=args.seed, height=args.height, width=args.width,
                               progress=True, handoff_blend=blend)
            out = Path(args.out) if not name else Path(args.out).with_suffix("") / f"{name}.png"
            for path in save_images(images, out):
                print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from expertune.export.formats import parse_formats
    from expertune.export_run import export_run

    paths = export_run(Path(args.source), Path(args.out) if args.out else None, parse_formats(args.export_format),
                       args.precision, revision=args.revision, variant=args.variant)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _cmd_init(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from expertune.init import write_starter

    written = write_starter(Path(args.folder), args.model, args.layout, args.gpu_memory, args.format,
                            Path(args.data) if args.data else None, Path(args.output) if args.output else None)
    for path in written:
        print(f"wrote {path}")
    return 0


def _add_init(verbs: Any) -> None:
    from expertune.init import FORMATS, LAYOUTS, MODELS

    init = verbs.add_parser("init", help="write a starter config for SSD-1B or SDXL sized for your GPU",
                            description="Write a starter configuration (SimpleTuner's config.json shape with a "
                            "README, or expertune's TOML with comments), the dataloader JSON and a prompt library. "
                            "Never overwrites a file.")
    init.add_argument("folder", nargs="?", default="config", help="where to write (default: config)")
    init.add_argument("--model", choices=list(MODELS), default="ssd-1b")
    init.add_argument("--layout", choices=LAYOUTS, default="two-stage",
                      help="two-stage: the recipe's two runs; mixture: both experts in one job")
    init.add_argument("--gpu_memory", type=float, default=24.0, metavar="GIB", help="GPU memory in GiB (default 24)")
    init.add_argument("--format", choices=FORMATS, default="json")
    init.add_argument("--data", default=None, help="your image folder (default: datasets/images)")
    init.add_argument("--output", default=None, help="where runs write (default: output)")
    init.set_defaults(handler=_cmd_init)


def _cmd_tiny_clip(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.models.tiny import build_tiny_clip

    path = build_tiny_clip(args.directory, seed=args.seed)
    print(f"wrote a tiny random CLIP model to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.demo.run import run_demo

    from expertune.demo.run import REFINER_STEPS, STEPS

    steps = args.steps or STEPS
    refiner_steps = args.refiner_steps or (args.steps if args.steps else REFINER_STEPS)
    result = run_demo(args.out, steps=steps, refiner_steps=refiner_steps, world=args.world)
    print(f"stage 1: {result.stage_dirs[0]}\nstage 2: {result.stage_dirs[1]}\nchained sample: {result.sample}")
    return 0


def _cmd_tiny_model(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.models.tiny import build_tiny_pipeline, build_tiny_refiner

    if args.refiner:
        path = build_tiny_refiner(args.directory, seed=args.seed, vae_from=args.share_with,
                                  text_encoder_from=args.share_with)
        print(f"wrote a tiny SDXL-refiner-layout pipeline to {path}")
        return 0
    if args.share_with:
        print("--share_with needs --refiner", file=sys.stderr)
        return 2
    path = build_tiny_pipeline(args.directory, seed=args.seed)
    print(f"wrote a tiny SDXL-layout pipeline to {path}")
    return 0


def _cmd_world_build(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.world.build import build_world

    manifest = build_world(args.directory, args.recipe, work=args.work, reuse=args.reuse)
    figures = manifest["figures"]
    print(f"world model written to {args.directory} in {manifest['seconds']['this_invocation']:.0f} s: "
          f"VAE {figures['vae']['psnr_db']:.1f} dB, CLIP zero-shot "
          f"{100 * figures['eval_clip']['zero_shot_accuracy_held_out_images']:.0f}%, "
          f"{manifest['weights_bytes'] / 2**20:.1f} MiB of weights")
    return 0


def _cmd_world_verify(args: argparse.Namespace, rest: list[str]) -> int:
    from expertune.world.build import verify_world

    problems = verify_world(args.directory)
    for problem in problems:
        print(f"{args.directory}: {problem}")
    if problems:
        print(f"rebuild with `expertune world build {args.directory}` or restore it from git", file=sys.stderr)
        return 1
    print(f"{args.directory}: every file matches its manifest")
    return 0


def _cmd_audit(args: argparse.Namespace, rest: list[str]) -> int:
    import json
    from pathlib import Path

    from expertune.config.schema import default_cache_dir
    from expertune.data.audit import AuditSettings, audit, format_report, write_exclude
    from expertune.data.dataloader import DatasetDefaults, load_dataloader_config

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    defaults = DatasetDefaults(resolution=args.resolution, resolution_type=args.resolution_type)
    loader = load_dataloader_config(args.dataloader, default_resolution=args.resolution, default_cache_dir=cache,
                                    defaults=defaults)
    settings = AuditSettings(min_quality=args.min_quality, max_aspect=args.max_aspect)
    reports = audit(loader.datasets, settings, cache)
    if args.json:
        print(json.dumps({"dataloader": str(loader.source), "datasets": [r.to_json() for r in reports]}, indent=2))
    else:
        print(format_report(reports))
    if args.write_exclude:
        count = write_exclude(args.write_exclude, reports)
        print(f"{count} images written to {args.write_exclude}; name it in an entry's \"exclude_file\"",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(config_flags=False)
    verbs = parser.add_subparsers(dest="verb", required=True)
    _add_training_verbs(verbs)
    _add_init(verbs)
    _add_audit(verbs)
    _add_generate(verbs)
    _add_export(verbs)
    _add_ui(verbs)
    _add_model_verbs(verbs)
    return parser


def _add_training_verbs(verbs: Any) -> None:
    """`train` and `cache`: the options of the typed config (--config, --env, --flags)."""
    from expertune.config.reference import options_help

    train = verbs.add_parser(
        "train",
        help="train one expert, or every expert of a mixture (--mixture_boundaries)",
        description="Train one expert. Options: --config FILE.toml, --env config.env, and any --flag "
        "below (docs/configuration.md has the same list with the config.env names).",
        epilog=options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.set_defaults(handler=_cmd_train, config_flags=True)

    cache = verbs.add_parser(
        "cache",
        help="build every latent and text embedding a run will need, without training",
        description="Build the caches a `train` of the same settings will read (VAE latents of every "
        "bucketed image, text embeddings of every caption and validation prompt), loading only the VAE, "
        "the text encoders and the tokenizers. Takes the options of `train` (--config, --env, --flags); "
        "needs pretrained_model_name_or_path and data_backend_config. Safe beside other jobs using the "
        "same caches.",
        allow_abbrev=False,
    )
    cache.add_argument("--stats_json", default=None, metavar="FILE",
                       help="also write the cache stats, bucket table and skipped images to this JSON file")
    cache.set_defaults(handler=_cmd_cache, config_flags=True)



def _add_audit(verbs: Any) -> None:
    audit = verbs.add_parser(
        "audit", help="report the images a careful user would leave out of a stage-2 set",
        description="Read a dataloader JSON (local or bucket datasets) and report, per dataset, the images "
        "below the training resolution, heavily compressed JPEGs, near-duplicates, extreme aspect ratios, "
        "unreadable files and missing, empty or shared captions. Never modifies or deletes a file.")
    audit.add_argument("dataloader", metavar="DATALOADER_JSON")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.add_argument("--write-exclude", dest="write_exclude", metavar="FILE", default=None,
                       help="write the flagged images (but shared captions) to FILE, for an entry's \"exclude_file\"")
    audit.add_argument("--resolution", type=float, default=1024,
                       help="training resolution of entries that do not set one (default 1024)")
    audit.add_argument("--resolution_type", default="pixel", choices=("pixel", "area", "pixel_area"))
    audit.add_argument("--min_quality", type=int, default=75, help="JPEG quality below this is flagged (default 75)")
    audit.add_argument("--max_aspect", type=float, default=3.0, help="longer/shorter edge above this is flagged")
    audit.add_argument("--cache_dir", default=None,
                       help="where bucket objects are fetched to (default: the per-user cache dir)")
    audit.set_defaults(handler=_cmd_audit)



def _add_generate(verbs: Any) -> None:
    from expertune.infer.schedulers import SCHEDULER_CLASSES

    generate = verbs.add_parser("generate", help="chain trained experts into images")
    generate.add_argument("--expert", action="append",
                          help="an expert dir, a training output dir, a checkpoint-N dir or a hub id of an exported "
                          "expert (local HF cache); repeat, any order")
    generate.add_argument("--mixture", default=None,
                          help="a mixture's directory (the output_dir of a --mixture_boundaries run, with mixture.json)")
    generate.add_argument("--base", default=None, metavar="MODEL",
                          help="instead of experts: the untouched model alone (a folder, .safetensors or a hub id in "
                          "the local HF cache), the baseline")
    generate.add_argument("--prompt", action="append",
                          help="the prompt; repeat once per expert (order of --expert, chain order with --mixture) "
                               "to give each expert its own")
    generate.add_argument("--prompts", default=None, metavar="FILE",
                          help="instead of --prompt: a file of prompts (one a line, or SimpleTuner's prompt library "
                          "JSON {name: prompt}), all made with one model load into OUT_STEM/<name>.png")
    generate.add_argument("--cpu_offload", action="store_true",
                          help="diffusers' model CPU offload: each model on the device only while it runs")
    generate.add_argument("--negative_prompt", default=None)
    generate.add_argument("--steps", type=int, default=30, help="inference steps of the whole chain")
    generate.add_argument("--guidance", type=float, action="append",
                          help="CFG scale (default 7.5): once for every expert, or once per --expert, same order")
    generate.add_argument("--guidance_rescale", type=float, action="append",
                          help="CFG rescale (default 0): once, or once per --expert; 0.7 recommended with "
                          "zero-terminal SNR")
    generate.add_argument("--scheduler", default="saved", choices=("saved", *SCHEDULER_CLASSES),
                          help="sampler; built from each expert's saved scheduler config (default: that "
                          "scheduler itself)")
    generate.add_argument("--handoff_blend", type=int, default=None, metavar="W",
                          help="blend the hand-offs: within W/2 timesteps of each boundary, mix both experts' "
                          "predictions linearly (docs/mixtures.md); 0: a hard switch (default: a --mixture's "
                          "handoff_blend in mixture.json, else 0)")
    generate.add_argument("--num_images", type=int, default=1,
                          help="images to make; image i uses seed S+i; several also write a grid")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--device", default="auto",
                          help="where to run: auto (a CUDA GPU when there is one, else MPS, else the CPU), cpu, "
                          "cuda, cuda:N, mps")
    generate.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                          help="weights and activations: auto = fp16 on a GPU, fp32 on the CPU; the VAE stays "
                          "fp32 where its config sets force_upcast (SDXL's overflows in fp16)")
    generate.add_argument("--aesthetic_score", type=float, default=6.0,
                          help="aesthetic-score time id of refiner-layout experts (diffusers' default 6.0)")
    generate.add_argument("--negative_aesthetic_score", type=float, default=2.5,
                          help="the same for their negative branch (diffusers' default 2.5)")
    generate.add_argument("--out", default="expertune.png",
                          help="PNG file to write (several images: OUT_00.png ... and their grid at OUT)")
    generate.set_defaults(handler=_cmd_generate)



def _cmd_ui(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from expertune.errors import ConfigError
    from expertune.ui.server import make_server

    workspace = Path(args.workspace)
    if not workspace.is_dir():
        raise ConfigError(f"ui: workspace {workspace} is not a folder; give the folder your runs write under")
    try:
        server, app = make_server(workspace, args.host, args.port)
    except OSError as error:
        raise ConfigError(f"ui: cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
                          "choose another --port") from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/" + (f"?token={app.guard.token}" if app.guard.token else "")
    print(f"expertune ui: serving {app.workspace} at {address}", flush=True)
    if app.guard.token:
        print("expertune ui: that address holds the access token (shown once); keep it private", flush=True)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("expertune ui: stopped (jobs it started keep running)", flush=True)
    finally:
        app.jobs.close()
        server.server_close()
    return 0


def _cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from expertune.ui.report import write_report

    path = write_report(Path(args.run_dir), Path(args.out), image_width=args.image_width)
    print(f"wrote {path}")
    return 0


def _add_ui(verbs: Any) -> None:
    ui = verbs.add_parser("ui", help="a local web app over the runs of a workspace: watch, compare, export, sample",
                          description="Serve the run list, live run pages, compare and jobs of the runs found under "
                          "WORKSPACE (docs/ui.md). Binds to 127.0.0.1; any other address needs the token it prints.")
    ui.add_argument("workspace", nargs="?", default=".", metavar="WORKSPACE", help="folder holding runs (default: .)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    ui.set_defaults(handler=_cmd_ui)
    report = verbs.add_parser("report", help="a run's page as one self-contained HTML file",
                              description="Write the run page of RUN_DIR (schedule, losses, held-out losses, gallery, "
                              "config) as one HTML file with its images inlined: no external requests.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("-o", "--out", default="report.html", help="file to write (default report.html)")
    report.add_argument("--image_width", type=int, default=256, help="inlined images' width in px (default 256)")
    report.set_defaults(handler=_cmd_report)


def _add_export(verbs: Any) -> None:
    export = verbs.add_parser(
        "export", help="turn a checkpoint (or a run's output directory) into experts: diffusers and/or single file",
        description="Write the expert(s) of a checkpoint-N folder, of a run's output directory (its newest checkpoint, "
        "or its exported experts when the run finished) or of an exported expert/mixture folder, as diffusers "
        "folders with expert.json (and mixture.json) and/or single .safetensors files for ComfyUI and A1111 with a "
        "ComfyUI workflow of the chain. Never overwrites anything but an earlier export.")
    export.add_argument("source", metavar="CHECKPOINT_OR_OUTPUT_DIR")
    export.add_argument("--out", default=None,
                        help="folder to write (default: OUTPUT_DIR/exports/checkpoint-N, or .../exports/final)")
    export.add_argument("--export_format", default="diffusers", help="diffusers, single_file, or both comma-separated")
    export.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="weights of everything written: diffusers folders and single files")
    export.add_argument("--revision", default=None, help="read the base model at this revision (default: the run's)")
    export.add_argument("--variant", default=None, help="read the base model's weights of this variant (e.g. fp16)")
    export.set_defaults(handler=_cmd_export)


def _add_model_verbs(verbs: Any) -> None:
    """`demo`, `world build|verify`, `tiny-model`, `tiny-clip`."""
    from expertune.world import PRETRAINED

    demo = verbs.add_parser("demo", help="the recipe on the committed world model: both stages trained, validated and chained")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--steps", type=int, default=None,
                      help="optimizer steps of stage 1, the high-noise expert (default: 900)")
    demo.add_argument("--refiner_steps", type=int, default=None,
                      help="optimizer steps of stage 2 (default: 300, or --steps when --steps is given)")
    demo.add_argument("--world", default=str(PRETRAINED),
                      help="world model dir (base/ and clip/) to start from (default: the committed one)")
    demo.set_defaults(handler=_cmd_demo)

    world = verbs.add_parser("world", help="the tiny world model: rebuild it from nothing, or verify it")
    world_verbs = world.add_subparsers(dest="world_verb", required=True)
    build = world_verbs.add_parser(
        "build", help="train the world model (VAE, text encoders, base UNet by `expertune train`, CLIP) into DIR",
        description="Rebuild the world model from nothing, deterministically on the CPU: fixed seeds, one thread "
        "per part, two parts side by side. DIR gets base/, clip/, build_log.jsonl and manifest.json (sha256 of "
        "every file and the build's figures) and is replaced only when the build succeeds.")
    build.add_argument("directory")
    build.add_argument("--recipe", default="full", choices=("full", "miniature"),
                       help="full: the committed model (about 26 min on 2 cores); miniature: a few steps of each part")
    build.add_argument("--work", default=None, help="keep the intermediate files here (default: a temporary dir)")
    build.add_argument("--reuse", default=None, metavar="EARLIER_DIR",
                       help="take the parts of an earlier build (verified against its manifest) whose recipes are "
                       "unchanged, and train only the rest: the result equals a build from nothing (every part is "
                       "deterministic); e.g. --reuse src/expertune/world/pretrained after changing the CLIP recipe")
    build.set_defaults(handler=_cmd_world_build)
    verify = world_verbs.add_parser("verify", help="check a world model dir against its manifest's sha256 sums")
    verify.add_argument("directory", nargs="?", default=str(PRETRAINED))
    verify.set_defaults(handler=_cmd_world_verify)

    tiny = verbs.add_parser("tiny-model", help="write a tiny SDXL-layout diffusers pipeline")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--refiner", action="store_true",
                      help="the SDXL refiner's layout (text encoder 2 only, aesthetic-score time ids), saved as a "
                      "StableDiffusionXLImg2ImgPipeline")
    tiny.add_argument("--share_with", default=None, metavar="BASE_DIR",
                      help="with --refiner: copy the VAE, text encoder 2 and tokenizer 2 of this tiny base")
    tiny.set_defaults(handler=_cmd_tiny_model)

    clip = verbs.add_parser("tiny-clip", help="write a tiny random CLIP model and processor (offline)")
    clip.add_argument("directory")
    clip.add_argument("--seed", type=int, default=0)
    clip.set_defaults(handler=_cmd_tiny_clip)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    _setup_logging(args.verbose)
    try:
        if rest and not args.config_flags:  # only train and cache take config flags
            raise ExpertuneError(f"{args.verb}: unknown arguments {' '.join(rest)}; see `expertune {args.verb} --help`")
        return int(args.handler(args, rest))
    except ExpertuneError as error:
        from expertune.redaction import scrub

        if args.verbose and error.__cause__ is not None:
            traceback.print_exception(error.__cause__, file=sys.stderr)
        print(f"expertune: error: {scrub(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("expertune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
