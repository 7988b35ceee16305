"""CLIP score (torchmetrics, tiny local CLIP, offline) and the per-band held-out loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from expertune.experts import ExpertBand, fixed_timesteps
from expertune.schedule import NoiseSchedule, add_noise, training_target
from expertune.validate.metrics import ClipScorer, HeldOutLoss, HeldOutSample, load_clip


def _image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_clip_score_of_a_tiny_local_clip_runs_offline_on_the_0_100_scale(tiny_clip_dir: Path) -> None:
    scorer = ClipScorer(str(tiny_clip_dir))
    named = [("red", _image(0), "a red circle"), ("blue", _image(1), "a blue square on a green background"),
             ("cat", _image(2), "a cat")]
    scores = scorer.scores(named)
    assert set(scores) == {"clip/red", "clip/blue", "clip/cat", "clip/mean"}
    assert scores["clip/mean"] == pytest.approx(sum(scores[f"clip/{n}"] for n, _, _ in named) / 3)
    # The documented formula, max(100 * cos(E_image, E_text), 0), from the CLIP model itself.
    model, processor = load_clip(str(tiny_clip_dir))
    with torch.no_grad():
        for name, image, prompt in named:
            inputs = processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
            out = model(**inputs)
            expected = max(100 * F.cosine_similarity(out.image_embeds, out.text_embeds).item(), 0.0)
            assert scores[f"clip/{name}"] == pytest.approx(expected, abs=1e-3)
            assert 0.0 <= scores[f"clip/{name}"] <= 100.0
    assert scorer.score(named[0][1], named[0][2]) == scores["clip/red"]  # no state carried between prompts
    assert scorer.scores([]) == {}


@pytest.fixture(scope="module")
def tiny_unet(tiny_model_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").eval()


def _samples(count: int) -> list[HeldOutSample]:
    g = torch.Generator().manual_seed(5)
    return [HeldOutSample(torch.randn(4, 8, 8, generator=g), torch.tensor([64., 64, 0, 0, 64, 64]),
                          torch.randn(77, 48, generator=g), torch.randn(32, generator=g)) for _ in range(count)]


def test_held_out_loss_is_reported_per_sub_band_at_fixed_noise_and_timesteps(tiny_unet) -> None:
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    samples = _samples(2)
    loss = HeldOutLoss(samples, ExpertBand(350, 999), schedule, subbands=4, timesteps_per_subband=2, seed=1)
    first = loss(tiny_unet, "cpu")
    assert list(first) == ["eval/loss_350_511", "eval/loss_512_674", "eval/loss_675_836", "eval/loss_837_999",
                           "eval/loss"]
    assert first["eval/loss"] == pytest.approx(sum(v for k, v in first.items() if k != "eval/loss") / 4)
    assert loss(tiny_unet, "cpu") == first  # fixed noise, fixed timesteps: nothing random between validations

    # One sub-band by hand: the training loss (MSE against the v target) at the fixed timesteps and noise.
    timesteps = torch.tensor(fixed_timesteps(ExpertBand(512, 674), 2))
    manual = 0.0
    for sample, noises in zip(samples, loss.noise):
        x0, noise = sample.latent.expand(2, -1, -1, -1), noises[1]
        with torch.no_grad():
            prediction = tiny_unet(add_noise(x0, noise, timesteps, schedule.alphas_cumprod), timesteps,
                                   encoder_hidden_states=sample.prompt_embeds.expand(2, -1, -1),
                                   added_cond_kwargs={"text_embeds": sample.pooled_embeds.expand(2, -1),
                                                      "time_ids": sample.time_ids.expand(2, -1)}).sample
        manual += F.mse_loss(prediction, training_target(x0, noise, timesteps, schedule.alphas_cumprod,
                                                         "v_prediction")).item() / len(samples)
    assert first["eval/loss_512_674"] == pytest.approx(manual, rel=1e-5)

    with torch.no_grad():
        tiny_unet.conv_out.bias.add_(0.5)
    try:
        assert loss(tiny_unet, "cpu")["eval/loss"] != first["eval/loss"]  # it measures the weights
    finally:
        with torch.no_grad():
            tiny_unet.conv_out.bias.sub_(0.5)
    assert HeldOutLoss([], ExpertBand(0, 349), schedule, subbands=4, timesteps_per_subband=2, seed=1)(tiny_unet, "cpu") == {}
    narrow = HeldOutLoss(samples[:1], ExpertBand(0, 2), schedule, subbands=4, timesteps_per_subband=1, seed=1)
    assert list(narrow(tiny_unet, "cpu")) == ["eval/loss_0_0", "eval/loss_1_1", "eval/loss_2_2", "eval/loss"]


def test_held_out_loss_is_batched_over_images_of_one_size_under_the_given_autocast(tiny_unet) -> None:
    """Issue 25: images of one latent size share a forward pass (batch_rows rows at most); the result is the one an
    image at a time gives; the run's autocast wraps every pass."""
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(9)
    wide = [HeldOutSample(torch.randn(4, 8, 12, generator=g), torch.tensor([64., 96, 0, 0, 64, 96]),
                          torch.randn(77, 48, generator=g), torch.randn(32, generator=g))]
    samples = _samples(3) + wide + _samples(2)  # two sizes: 3 square, 1 wide, 2 square
    one_by_one = HeldOutLoss(samples, ExpertBand(350, 999), schedule, subbands=2, timesteps_per_subband=2, seed=1,
                             batch_rows=2)
    batched = HeldOutLoss(samples, ExpertBand(350, 999), schedule, subbands=2, timesteps_per_subband=2, seed=1,
                          batch_rows=16)
    passes: list[int] = []
    hook = tiny_unet.register_forward_pre_hook(lambda module, args: passes.append(int(args[0].shape[0])))
    try:
        single = one_by_one(tiny_unet, "cpu")
        assert passes == [2] * 12  # 6 images × 2 sub-bands, one image (2 timesteps) a pass
        passes.clear()
        together = batched(tiny_unet, "cpu")
        assert passes == [6, 2, 4] * 2  # per sub-band: 3 square images, the wide one, 2 square
    finally:
        hook.remove()
    assert together == pytest.approx(single, rel=1e-5)
    entered: list[bool] = []

    def autocast():
        entered.append(True)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    low = batched(tiny_unet, "cpu", autocast)
    assert len(entered) == 6 and low != together and low == pytest.approx(together, rel=0.1)
