"""Publishing a run to the Hugging Face hub: the model cards, the upload folder, the upload (`--push_to_hub`).

The upload folder `<output_dir>/hub_upload/` is built from what the run exported, files hard-linked (copied where
links cannot be made), and is exactly what goes to the repository:

- one expert: the expert's `pipeline/` (or `lora/`) contents at the top, so that
  `StableDiffusionXLPipeline.from_pretrained(REPO)` loads it, its card as README.md, the last validation images
  under images/;
- a mixture: mixture.json and each `expert-<k>/` as in the output directory, each expert's card as
  `expert-<k>/README.md` with its images under `expert-<k>/images/`, the mixture's card as README.md;
- both: any other file the export wrote (single files, workflows) at its place, never the run's internals
  (checkpoints, logs, validation, metrics.jsonl, run.json, W&B files).

The upload runs after the local export and run.json: a missing token, no network or a refusal stops it with a
`HubUploadError` naming the saved experts and the command that retries it. The token is never printed or written.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from expertune.config import Config
from expertune.errors import HubUploadError
from expertune.hub_upload import push_folder
from expertune.expert_format import EXPERT_FILE, MIXTURE_FILE, ExpertDescription, MixtureDescription
from expertune.experts import ExpertBand
from expertune.io_utils import staged_directory
from expertune.models.source import looks_like_path
from expertune.train.metrics import read_metrics

log = logging.getLogger(__name__)

UPLOAD_FOLDER = "hub_upload"
EXPERT_FOLDERS = ("pipeline", "lora")
# What a run keeps for itself: never uploaded (checkpoints only with --push_checkpoints_to_hub, on their own).
RUN_INTERNALS = frozenset({"checkpoints", "logs", "validation", "metrics.jsonl", "run.json", "wandb", UPLOAD_FOLDER})
TAGS = ("expertune", "stable-diffusion-xl", "diffusers", "timestep-expert")


@dataclass(frozen=True)
class PublishedExpert:
    """One expert as its card shows it: where it lies (relative to the upload folder), what it is, how it did."""

    path: str  # "" for a single expert at the top of the repository, else e.g. "expert-0/pipeline"
    description: ExpertDescription
    images: tuple[Path, ...]  # the last validation's images (in the run's validation/ folder)
    numbers: dict[str, float]  # the last validation's numbers (eval/loss_<lo>_<hi>, eval/loss, clip/...)


# ---- reading the run --------------------------------------------------------------------------------------------

def last_validation_images(output_dir: Path, label: str = "") -> tuple[Path, ...]:
    """The PNGs of the run's last validation (`validation/step_N/[expert_k/]`), sorted; () without one."""
    steps = sorted((output_dir / "validation").glob("step_*"))
    if not steps:
        return ()
    folder = steps[-1] / label if label else steps[-1]
    return tuple(sorted(folder.glob("*.png")))


def last_validation_numbers(output_dir: Path, expert: int | str | None = None) -> dict[str, float]:
    """The numbers of the last validation row of `expert` (None: a single expert's rows) in metrics.jsonl."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [r for r in read_metrics(path, kind="validation") if r.get("expert") == expert]
    if not rows:
        return {}
    return {k: float(v) for k, v in rows[-1].items() if "/" in k and isinstance(v, (int, float))}


def published_experts(output_dir: Path) -> tuple[list[PublishedExpert], MixtureDescription | None]:
    """The run's exported experts in chain order, and its mixture (None for one expert)."""
    if (output_dir / MIXTURE_FILE).is_file():
        mixture = MixtureDescription.read(output_dir)
        experts = [PublishedExpert(member.path, ExpertDescription.read(output_dir / member.path),
                                   last_validation_images(output_dir, f"expert_{k}"),
                                   last_validation_numbers(output_dir, k))
                   for k, member in enumerate(mixture.experts)]
        return experts, mixture
    for name in EXPERT_FOLDERS:
        if (output_dir / name / EXPERT_FILE).is_file():
            return [PublishedExpert("", ExpertDescription.read(output_dir / name), last_validation_images(output_dir),
                                    last_validation_numbers(output_dir))], None
    raise HubUploadError(f"{output_dir} holds no exported expert (pipeline/ or lora/ with expert.json, or "
                         "mixture.json): nothing to upload")


# ---- the cards --------------------------------------------------------------------------------------------------

def hub_base_model(description: ExpertDescription) -> str | None:
    """The base model as a hub id, for the card's `base_model`; None when it was a local path."""
    base = description.base_model
    if not base or looks_like_path(base) or Path(base).expanduser().exists():
        return None
    return base


def _front_matter(base_model: str | None, pipeline_tag: str, lora: bool) -> str:
    from huggingface_hub import ModelCardData

    tags = [*TAGS, pipeline_tag, *(["lora"] if lora else [])]
    data = ModelCardData(base_model=base_model, tags=tags, library_name="diffusers", pipeline_tag=pipeline_tag)
    return f"---\n{data.to_yaml()}\n---\n"


def _role(band: ExpertBand) -> str:
    if band.holds_start and band.holds_end:
        return "the whole schedule: a plain text-to-image model"
    if band.holds_start:
        return f"the first stage: it denoises from pure noise and hands over at denoising_end={band.denoising_end:g}"
    hand_over = f" and hands over at denoising_end={band.denoising_end:g}" if not band.holds_end else ""
    return f"a later stage: it continues the previous expert's latents from denoising_start={band.denoising_start:g}" \
           f"{hand_over}"


def _base_words(description: ExpertDescription) -> str:
    """The base model for the card: its hub id, or only the folder name of a local one (no local paths shared)."""
    base = description.base_model
    if not base:
        return "unknown"
    return base if hub_base_model(description) else f"a local model ({Path(base).name})"


def _facts(description: ExpertDescription) -> str:
    band, p = description.band, description.parameterisation
    rows = [("band", f"timesteps [{band.lo}, {band.hi}] of {band.num_train_timesteps}: {_role(band)}"),
            ("parameterisation", ", ".join(f"{k}={p[k]}" for k in ("prediction_type", "rescale_betas_zero_snr",
                                                                     "timestep_spacing", "beta_schedule") if k in p)),
            ("weights", f"{'LoRA adapters' if description.model_type == 'lora' else 'the full UNet'} "
                        f"({description.weights} weights)"),
            ("base model", _base_words(description))]
    return "| | |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)


def _loader(description: ExpertDescription, location: str, variable: str, first: bool) -> list[str]:
    """Lines loading one expert of a chain as a diffusers pipeline (`location`: a repo id or a local folder)."""
    cls = "StableDiffusionXLPipeline" if first else "StableDiffusionXLImg2ImgPipeline"
    if description.model_type != "lora":
        return [f'{variable} = {cls}.from_pretrained({location}, torch_dtype=torch.float16).to("cuda")']
    base = hub_base_model(description) or "BASE_MODEL"  # a local base: the user's own path, not shared
    return [f'{variable} = {cls}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            f"{variable}.load_lora_weights({location})",
            f"{variable}.scheduler = {variable}.scheduler.from_pretrained({location}, subfolder=\"scheduler\")"]


def chain_code(experts: list[tuple[ExpertDescription, str]], preamble: list[str] | None = None) -> str:
    """The diffusers code that runs experts (each with the Python expression of its location) as one chain."""
    lines = ["import torch", "from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline",
             *(preamble or []), "", 'prompt = "a photo of a cat"', "steps = 30"]
    previous = None
    for index, (description, location) in enumerate(experts):
        band, name = description.band, f"expert_{index}"
        lines += ["", f"# expert {index}: timesteps [{band.lo}, {band.hi}]"]
        lines += _loader(description, location, name, first=index == 0)
        args = ["prompt", "num_inference_steps=steps"]
        if previous is not None:
            args.append(f"image={previous}")
        if band.denoising_start is not None:
            args.append(f"denoising_start={band.denoising_start:g}")
        if band.denoising_end is not None:
            args.append(f"denoising_end={band.denoising_end:g}")
        last = index == len(experts) - 1
        if description.parameterisation.get("rescale_betas_zero_snr"):
            args.append("guidance_rescale=0.7")
        if not last:
            args.append('output_type="latent"')
        lines.append(f"{'image' if last else 'latents'} = {name}({', '.join(args)}).{'images[0]' if last else 'images'}")
        previous = "latents"
    lines.append('image.save("chain.png")')
    return "```python\n" + "\n".join(lines) + "\n```\n"


def _losses(numbers: dict[str, float]) -> str:
    bands = sorted((tuple(int(x) for x in m.groups()), value) for key, value in numbers.items()
                   if (m := re.fullmatch(r"eval/loss_(\d+)_(\d+)", key)))
    if not bands and "eval/loss" not in numbers:
        return "No held-out images were set aside (--eval_holdout_fraction): no held-out loss.\n"
    text = "| timesteps | held-out loss |\n|---|---|\n" + "".join(f"| {lo}–{hi} | {v:.5f} |\n" for (lo, hi), v in bands)
    if "eval/loss" in numbers:
        text += f"| mean over the band | {numbers['eval/loss']:.5f} |\n"
    clip = numbers.get("clip/mean")
    return text + (f"\nCLIP score (mean over the validation prompts): {clip:.4f}\n" if clip is not None else "")


def _gallery(images: tuple[Path, ...], folder: str) -> str:
    if not images:
        return "No validation images were made (validation was disabled).\n"
    return "".join(f"**{image.stem}**\n\n![{image.stem}]({folder}/{image.name})\n\n" for image in images)


def _with_neighbours(description: ExpertDescription, location: str) -> list[tuple[ExpertDescription, str]]:
    """The expert with the stages a chain needs around it: one for the timesteps above it, one for those below."""
    band, n = description.band, description.band.num_train_timesteps
    chain = [(description, location)]
    if not band.holds_start:
        chain.insert(0, (ExpertDescription(ExpertBand(band.hi + 1, n - 1, n), description.parameterisation), '"OTHER"'))
    if not band.holds_end:
        chain.append((ExpertDescription(ExpertBand(0, band.lo - 1, n), description.parameterisation), '"OTHER"'))
    return chain


def expert_card(expert: PublishedExpert, repo_id: str, *, mixture_path: str | None = None) -> str:
    """README.md of one expert: front matter, what it is, the chain in diffusers code, validation images, losses."""
    d = expert.description
    tag = "text-to-image" if d.band.holds_start else "image-to-image"
    title = f"{repo_id}" + (f" — {expert.path}" if expert.path else "")
    if mixture_path is None:
        code = chain_code(_with_neighbours(d, f'"{repo_id}"'))
        if not (d.band.holds_start and d.band.holds_end):
            code = "Chain it with an expert of the other timesteps (put its repository or folder in place of " \
                   "`OTHER`):\n\n" + code
    else:
        code = f"This expert is one stage of the mixture at the top of this repository ({mixture_path}): its " \
               "card has the whole chain in diffusers code.\n"
    return (_front_matter(hub_base_model(d), tag, d.model_type == "lora") + f"\n# {title}\n\n"
            f"A timestep expert trained with expertune: it owns {_role(d.band)}.\n\n{_facts(d)}\n"
            f"## Use\n\n{code}\nOr with expertune: `expertune generate --expert DIR ...` (one `--expert` per stage).\n\n"
            f"## Validation (last validation of the run)\n\n{_gallery(expert.images, 'images')}"
            f"## Held-out loss per band\n\n{_losses(expert.numbers)}")


def mixture_card(experts: list[PublishedExpert], mixture: MixtureDescription, repo_id: str,
                 chain_images: tuple[Path, ...], mixture_loss: float | None) -> str:
    """README.md of a mixture: every expert's band, the whole chain in diffusers code, the chain's images."""
    first = experts[0].description
    rows = "".join(f"| [{e.path}]({e.path.split('/')[0]}/README.md) | [{e.description.band.lo}, "
                   f"{e.description.band.hi}] | {e.description.model_type} | "
                   f"{e.numbers['eval/loss']:.5f} |\n" if "eval/loss" in e.numbers else
                   f"| [{e.path}]({e.path.split('/')[0]}/README.md) | [{e.description.band.lo}, "
                   f"{e.description.band.hi}] | {e.description.model_type} | – |\n" for e in experts)
    preamble = ["from huggingface_hub import snapshot_download", "", f'root = snapshot_download("{repo_id}")']
    code = chain_code([(e.description, f'f"{{root}}/{e.path}"') for e in experts], preamble)
    total = f"\nHeld-out loss of the whole mixture (each timestep scored by its expert): {mixture_loss:.5f}\n" \
        if mixture_loss is not None else ""
    return (_front_matter(hub_base_model(first), "text-to-image", first.model_type == "lora") + f"\n# {repo_id}\n\n"
            f"A mixture of {len(experts)} timestep experts trained with expertune, each owning one band of the "
            f"{first.band.num_train_timesteps} timesteps; chained in order, they make one image.\n\n"
            f"| expert | timesteps | weights | held-out loss over its band |\n|---|---|---|---|\n{rows}{total}\n"
            f"Parameterisation shared by every expert: " + ", ".join(
                f"{k}={mixture.parameterisation[k]}" for k in ("prediction_type", "rescale_betas_zero_snr",
                                                               "timestep_spacing") if k in mixture.parameterisation) +
            f"\n\n## Use\n\n{code}\nOr with expertune: `expertune generate --mixture {{root}} --prompt ...`.\n\n"
            f"## Validation: the whole chain\n\n{_gallery(chain_images, 'images')}")


# ---- the upload folder ------------------------------------------------------------------------------------------

def _link(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (no space used), a copy where links cannot be made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(folder).parts))


def build_upload_folder(output_dir: Path, repo_id: str) -> Path:
    """`<output_dir>/hub_upload/`: what the repository gets (see the module doc), rebuilt whole each time."""
    experts, mixture = published_experts(output_dir)
    placed: set[Path] = set()  # files of the output directory already in the folder
    with staged_directory(output_dir / UPLOAD_FOLDER) as staged:
        if mixture is None:
            (expert,) = experts
            source = next(output_dir / name for name in EXPERT_FOLDERS if (output_dir / name / EXPERT_FILE).is_file())
            for path in _files(source):
                _link(path, staged / path.relative_to(source))
                placed.add(path)
            card = expert_card(expert, repo_id)
            image_folder = staged / "images"
            for image in expert.images:
                _link(image, image_folder / image.name)
        else:
            for index, expert in enumerate(experts):
                top = expert.path.split("/")[0]
                for path in _files(output_dir / expert.path):
                    _link(path, staged / path.relative_to(output_dir))
                    placed.add(path)
                for image in expert.images:
                    _link(image, staged / top / "images" / image.name)
                card_text = expert_card(expert, repo_id, mixture_path=f"expert {index} of {len(experts)}")
                (staged / top / "README.md").write_text(card_text, encoding="utf-8")
            chain = tuple(p for p in last_validation_images(output_dir, "expert_0") if p.name.startswith("chain_"))
            for image in chain:
                _link(image, staged / "images" / image.name)
            loss = last_validation_numbers(output_dir, "mixture").get("eval/mixture_loss")
            card = mixture_card(experts, mixture, repo_id, chain, loss)
        for path in _files(output_dir):  # what else the export wrote: single files, workflows
            relative = path.relative_to(output_dir)
            if path not in placed and relative.parts[0] not in RUN_INTERNALS:
                _link(path, staged / relative)
        (staged / "README.md").write_text(card, encoding="utf-8")
    log.info("hub upload folder for %s built in %s", repo_id, output_dir / UPLOAD_FOLDER)
    return output_dir / UPLOAD_FOLDER


# ---- the upload -------------------------------------------------------------------------------------------------

def publish_run(config: Config) -> str:
    """`--push_to_hub` at the end of a run: build the upload folder of the run in output_dir and upload it; the
    URL of the commit."""
    from expertune.config.schema import required

    output_dir = Path(required(config.train.output_dir, "output_dir")).expanduser()
    repo_id = required(config.hub.hub_model_id, "hub_model_id")
    folder = build_upload_folder(output_dir, repo_id)
    try:
        url = push_folder(folder, repo_id, message="expertune: the trained experts and their model cards")
    except HubUploadError as error:
        raise HubUploadError(f"{error}. The experts are saved in {output_dir} and the upload folder in {folder}: "
                             f"upload it later with `hf upload {repo_id} {folder} .`") from error.__cause__
    log.info("uploaded %s to the hub: %s", folder, url)
    return url
