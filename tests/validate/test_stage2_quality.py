"""A trained stage-2 expert really continues its input: a measured check, not a constant.

The tiny model's stage 2 is trained for 8 steps on the six shapes of `small_dataset`. Partial denoising
(the function stage-2 validation uses) from the first inference timestep below 350 must land closer to
the input than pure noise does, on every image — measured in latent space (mean squared distance to the
clean latent): the tiny model's VAE decoder has random weights and maps every latent to nearly the same
pixels, so pixel distances cannot tell outputs apart. The untrained model fails the same check, so it
measures the training, not the leftover signal of the noised input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import write_stage_env
from expertune.config import load_config
from expertune.experts import ExpertBand
from expertune.infer.chain import ChainStage
from expertune.train.loop import train
from expertune.train.metrics import read_metrics
from expertune.validate.samples import SamplerSettings, partial_denoise

pytestmark = pytest.mark.integration  # trains or launches processes: not in `make test-fast`

SETTINGS = SamplerSettings(num_inference_steps=6, guidance_scale=1.0, guidance_rescale=0.0, seed=0)


@pytest.fixture(scope="module")
def trained_stage_2(tiny_model_dir: Path, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stage2-quality")
    env = write_stage_env(root, 2, tiny_model_dir, root / "stage2", small_dataset)
    config, _ = load_config(["--env", str(env), "--max_train_steps=8", "--resolution=64", "--learning_rate=1e-3",
                             "--train_batch_size=3", "--gradient_checkpointing=false", "--report_to=none",
                             "--validation_on_startup", "--validation_num_inference_steps=4",
                             "--eval_holdout_fraction=0.17", "--eval_subbands=2", "--eval_timesteps_per_subband=2"])
    return train(config)


def _latent_distances(pipeline_dir: Path, small_dataset: Path, first_timestep: int) -> torch.Tensor:
    """Per image: (MSE(output, x0), MSE(pure noise, x0)) in latent space."""
    from diffusers import StableDiffusionXLPipeline

    from expertune.data.transforms import image_to_tensor, load_image, plan_crop

    pipe = StableDiffusionXLPipeline.from_pretrained(str(pipeline_dir))
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    stage = ChainStage(parts, ExpertBand(0, 349), SETTINGS.guidance_scale, SETTINGS.guidance_rescale)
    rows = []
    for index, path in enumerate(sorted((small_dataset.parent / "images").glob("*.png"))):
        image = load_image(path)
        pixels = image_to_tensor(image, plan_crop((image.height, image.width), 64, "center", 0, str(path)))
        with torch.no_grad():
            x0 = pipe.vae.encode(pixels.unsqueeze(0)).latent_dist.mean * pipe.vae.config.scaling_factor
            _, start, output = partial_denoise(stage, x0, {"prompt": path.with_suffix(".txt").read_text()}, SETTINGS)
        assert int(start[0]) == first_timestep  # the first inference timestep below 350
        pure = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + index))
        rows.append((torch.mean((output - x0) ** 2).item(), torch.mean((pure - x0) ** 2).item()))
    return torch.tensor(rows)


def test_stage_2_output_is_closer_to_its_input_than_pure_noise(trained_stage_2, tiny_model_dir: Path,
                                                               small_dataset: Path) -> None:
    trained = _latent_distances(trained_stage_2.pipeline_dir, small_dataset, 332)  # trailing, 6 steps
    ratios = trained[:, 0] / trained[:, 1]
    print(f"trained: output {trained[:, 0].mean():.4f} vs noise {trained[:, 1].mean():.4f}, "
          f"ratios {[round(r, 3) for r in ratios.tolist()]}")
    assert len(ratios) == 6 and bool((ratios < 0.5).all()), ratios  # every image, by a wide margin
    untrained = _latent_distances(tiny_model_dir, small_dataset, 333)  # SDXL's own leading spacing
    print(f"untrained: output {untrained[:, 0].mean():.4f} vs noise {untrained[:, 1].mean():.4f}")
    assert untrained[:, 0].mean() > 0.8 * untrained[:, 1].mean()  # the untrained expert does not pass


def test_held_out_loss_falls_as_stage_2_trains(trained_stage_2) -> None:
    records = read_metrics(trained_stage_2.output_dir / "metrics.jsonl", kind="validation")
    assert [r["step"] for r in records] == [0, 8]  # --validation_on_startup, then the end
    keys = {"eval/loss", "eval/loss_0_174", "eval/loss_175_349"}
    assert all(keys <= set(r) for r in records)
    print({k: (records[0][k], records[1][k]) for k in sorted(keys)})
    assert records[1]["eval/loss"] < records[0]["eval/loss"]
    assert (trained_stage_2.output_dir / "validation" / "step_000000" / "partial_denoise_00.png").is_file()
    assert len(read_metrics(trained_stage_2.output_dir / "metrics.jsonl")) == 8  # training lines unchanged
