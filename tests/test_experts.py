from __future__ import annotations

import pytest
import torch

from expertune.experts import (
    ExpertBand,
    band_from_settings,
    boundary_from_strength,
    fixed_timesteps,
    order_chain,
    partition_problems,
    parse_timestep_range,
    sub_bands,
)
from expertune.schedule import inference_timesteps


def test_reference_table_of_bands() -> None:
    assert ExpertBand.from_refiner_flags(1000, True, 0.35, False) == ExpertBand(0, 349)
    assert ExpertBand.from_refiner_flags(1000, True, 0.35, True) == ExpertBand(350, 999)
    assert ExpertBand.from_refiner_flags(1000, False, 0.35, False) == ExpertBand(0, 999)
    with pytest.raises(ValueError, match="needs --refiner_training"):
        ExpertBand.from_refiner_flags(1000, False, 0.35, True)


def test_boundary_is_exact_for_every_three_decimal_strength() -> None:
    for thousandths in range(1, 1000):
        strength = thousandths / 1000
        assert boundary_from_strength(strength, 1000) == thousandths
    assert boundary_from_strength(0.29, 100) == 29  # 0.29 * 100 == 28.999... in floating point


def test_explicit_range_and_validation() -> None:
    band = band_from_settings(
        1000,
        refiner_training=False,
        refiner_training_strength=0.2,
        refiner_training_invert_schedule=False,
        timestep_range="200,499",
    )
    assert (band.lo, band.hi) == (200, 499)
    assert parse_timestep_range(" 0 , 349 ") == (0, 349)
    with pytest.raises(ValueError, match="LO,HI"):
        parse_timestep_range("350")
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 999"):
        ExpertBand(500, 1000)
    with pytest.raises(ValueError):
        ExpertBand(600, 500)


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("band", [ExpertBand(0, 349), ExpertBand(350, 999), ExpertBand(7, 7), ExpertBand(0, 2)])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8, 64, 1000])
def test_sampling_stays_inside_the_band(band: ExpertBand, batch_size: int, stratified: bool) -> None:
    g = torch.Generator().manual_seed(batch_size)
    for _ in range(20):
        t = band.sample(batch_size, g, stratified=stratified)
        assert t.shape == (batch_size,) and t.dtype == torch.long
        assert bool(band.contains(t).all()), (band, t.min(), t.max())


def test_sampling_covers_the_whole_band_and_stratification_spreads_a_batch() -> None:
    band = ExpertBand(350, 999)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([band.sample(64, g) for _ in range(400)])
    assert seen.min().item() == 350 and seen.max().item() == 999
    # Stratified: each of the batch's strata holds exactly one sample.
    t = band.sample(10, g, stratified=True)
    strata = ((t - band.lo) * 10 // band.size).sort().values
    assert strata.tolist() == list(range(10))


def test_sampling_is_reproducible_from_the_generator() -> None:
    band = ExpertBand(0, 349)
    a = band.sample(16, torch.Generator().manual_seed(3), stratified=True)
    b = band.sample(16, torch.Generator().manual_seed(3), stratified=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("steps, base_steps, refiner_steps", [(20, 13, 7), (30, 20, 10), (40, 26, 14), (50, 33, 17)])
def test_hand_off_matches_diffusers_cutoff(steps: int, base_steps: int, refiner_steps: int) -> None:
    base, refiner = ExpertBand(350, 999), ExpertBand(0, 349)
    assert base.denoising_end == pytest.approx(0.65) and refiner.denoising_start == pytest.approx(0.65)
    timesteps = inference_timesteps(1000, steps, "trailing")
    # diffusers: denoising_end keeps t >= round(N - end * N); denoising_start keeps t < round(N - start * N).
    cutoff_end = int(round(1000 - base.denoising_end * 1000))
    cutoff_start = int(round(1000 - refiner.denoising_start * 1000))
    base_part = [t for t in timesteps if t >= cutoff_end]
    refiner_part = [t for t in timesteps if t < cutoff_start]
    assert (len(base_part), len(refiner_part)) == (base_steps, refiner_steps)
    assert all(base.lo <= t <= base.hi for t in base_part)
    assert all(refiner.lo <= t <= refiner.hi for t in refiner_part)
    if steps == 40:
        assert refiner_part[0] == 349


def test_chain_order_and_partition_problems() -> None:
    bands = [ExpertBand(0, 349), ExpertBand(600, 999), ExpertBand(350, 599)]
    assert order_chain(bands) == [1, 2, 0]
    assert partition_problems(bands) == []
    assert "gap [300, 349]" in partition_problems([ExpertBand(0, 299), ExpertBand(350, 999)])[0]
    assert "overlap" in partition_problems([ExpertBand(0, 400), ExpertBand(350, 999)])[0]
    assert "t = 0" in partition_problems([ExpertBand(350, 999)])[0]


# ---- sub-bands and fixed timesteps of the per-band validation loss ----------------------------------

@pytest.mark.parametrize("band, count, expected", [
    (ExpertBand(350, 999), 4, [(350, 511), (512, 674), (675, 836), (837, 999)]),
    (ExpertBand(0, 349), 4, [(0, 86), (87, 174), (175, 261), (262, 349)]),
    (ExpertBand(0, 349), 1, [(0, 349)]),
    (ExpertBand(0, 999), 3, [(0, 332), (333, 665), (666, 999)]),
    (ExpertBand(10, 13), 4, [(10, 10), (11, 11), (12, 12), (13, 13)]),
])
def test_sub_bands_follow_the_formula(band, count, expected) -> None:
    parts = sub_bands(band, count)
    assert [(p.lo, p.hi) for p in parts] == expected
    cuts = [band.lo + (k * band.size) // count for k in range(count + 1)]  # lo + floor(k * size / count)
    assert [p.lo for p in parts] == cuts[:-1] and [p.hi + 1 for p in parts] == cuts[1:]


@pytest.mark.parametrize("band", [ExpertBand(350, 999), ExpertBand(0, 349), ExpertBand(0, 999), ExpertBand(5, 5)])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_sub_bands_tile_the_band_in_near_equal_parts(band, count) -> None:
    if count > band.size:
        with pytest.raises(ValueError, match="sub-bands"):
            sub_bands(band, count)
    else:
        parts = sub_bands(band, count)
        assert parts[0].lo == band.lo and parts[-1].hi == band.hi
        assert partition_problems(parts + ([ExpertBand(0, band.lo - 1)] if band.lo else [])
                                  + ([ExpertBand(band.hi + 1, 999)] if band.hi < 999 else [])) == []
        assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
        assert all(p.num_train_timesteps == band.num_train_timesteps for p in parts)


def test_fixed_timesteps_are_stratum_midpoints_inside_the_band() -> None:
    assert fixed_timesteps(ExpertBand(350, 511), 4) == [370, 410, 451, 491]  # 350 + floor((2j+1) * 162 / 8)
    assert fixed_timesteps(ExpertBand(0, 349), 1) == [175]
    assert fixed_timesteps(ExpertBand(7, 7), 3) == [7, 7, 7]
    for band in (ExpertBand(0, 86), ExpertBand(837, 999), ExpertBand(0, 999)):
        for count in (1, 2, 4, 5):
            values = fixed_timesteps(band, count)
            assert values == sorted(values) and len(set(values)) == count
            assert all(band.lo <= t <= band.hi for t in values)
            assert values == [band.lo + ((2 * j + 1) * band.size) // (2 * count) for j in range(count)]
    with pytest.raises(ValueError):
        fixed_timesteps(ExpertBand(0, 10), 0)


# ---- edges a careless edit would move (docs/testing.md: mutation testing) ----------------------------

@pytest.mark.parametrize("band", [ExpertBand(0, 349), ExpertBand(350, 999), ExpertBand(0, 2), ExpertBand(10, 13)])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 8])
def test_stratified_draws_reach_both_ends_of_the_band(band: ExpertBand, batch_size: int) -> None:
    """The lowest timestep of a refiner's band is t = 0: a sampler that never draws it never trains the last step."""
    g = torch.Generator().manual_seed(batch_size)
    seen = torch.cat([band.sample(batch_size, g, stratified=True) for _ in range(3000 // batch_size + 50)])
    assert seen.min().item() == band.lo and seen.max().item() == band.hi
    assert set(seen.tolist()) == set(range(band.lo, band.hi + 1)) or band.size > 100


def test_a_stratified_batch_as_large_as_the_band_holds_every_timestep_once() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sorted(ExpertBand(10, 13).sample(4, g, stratified=True).tolist()) == [10, 11, 12, 13]


def test_draws_are_a_fixed_function_of_the_generator() -> None:
    """Resume depends on it: uniform draws are torch.randint over [lo, hi]; stratified ones one float64 offset and
    one random stratum order per sample."""
    band = ExpertBand(0, 999)
    assert band.sample(4, torch.Generator().manual_seed(0)).tolist() == \
        torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(0)
    offsets = torch.rand(4, generator=g, dtype=torch.float64)
    order = torch.randperm(4, generator=g).to(torch.float64)
    expected = ((order + offsets) * 250).floor().long().tolist()
    assert band.sample(4, torch.Generator().manual_seed(0), stratified=True).tolist() == expected
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        band.sample(0)


def test_contains_is_inside_both_ends() -> None:
    t = torch.tensor([0, 349, 350, 600, 999])
    assert ExpertBand(350, 600).contains(t).tolist() == [False, False, True, True, False]


def test_bands_of_a_schedule_other_than_1000_keep_its_length() -> None:
    assert ExpertBand.full(100) == ExpertBand(0, 99, 100)
    assert ExpertBand.from_refiner_flags(100, True, 0.35, False) == ExpertBand(0, 34, 100)
    assert ExpertBand.from_refiner_flags(100, True, 0.35, True) == ExpertBand(35, 99, 100)
    assert ExpertBand.from_refiner_flags(100, False, 0.35, False) == ExpertBand(0, 99, 100)
    assert band_from_settings(100, refiner_training=True, refiner_training_strength=0.2,
                              refiner_training_invert_schedule=True, timestep_range=None) == ExpertBand(20, 99, 100)
    assert band_from_settings(100, refiner_training=True, refiner_training_strength=0.2,
                              refiner_training_invert_schedule=False, timestep_range=None) == ExpertBand(0, 19, 100)
    assert band_from_settings(100, refiner_training=False, refiner_training_strength=0.2,
                              refiner_training_invert_schedule=False, timestep_range="3,7") == ExpertBand(3, 7, 100)


def test_strength_and_boundary_limits() -> None:
    assert ExpertBand.from_refiner_flags(1000, True, 0.001, False) == ExpertBand(0, 0)  # a boundary of 1 is a band
    assert ExpertBand.from_refiner_flags(1000, True, 0.999, True) == ExpertBand(999, 999)
    with pytest.raises(ValueError, match=r"^refiner_training_strength=0.0005 leaves no timestep below the boundary$"):
        ExpertBand.from_refiner_flags(1000, True, 0.0005, False)
    for strength in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^refiner_training_strength must be in \(0, 1\), got {strength}$"):
            boundary_from_strength(strength, 1000)
    with pytest.raises(ValueError, match=r"^--refiner_training_invert_schedule needs --refiner_training$"):
        ExpertBand.from_refiner_flags(1000, False, 0.35, True)


@pytest.mark.parametrize(("text", "message"), [
    ("-1,5", "timestep_range='-1,5' is not valid: expected 0 <= LO <= HI"),
    ("6,5", "timestep_range='6,5' is not valid: expected 0 <= LO <= HI"),
    ("1-,5", "timestep_range='1-,5' is not valid: expected 'LO,HI' with two integers, e.g. '0,349'"),
    ("a,5", "timestep_range='a,5' is not valid: expected 'LO,HI' with two integers, e.g. '0,349'"),
])
def test_a_timestep_range_is_refused_with_its_text(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_timestep_range(text)
    assert str(caught.value) == message
    assert parse_timestep_range("5,5") == (5, 5)


def test_partition_problems_name_each_gap_overlap_and_missing_end() -> None:
    assert partition_problems([ExpertBand(0, 348), ExpertBand(350, 999)]) == \
        ["bands [0, 348] and [350, 999] leave a gap [349, 349]"]
    assert partition_problems([ExpertBand(0, 350), ExpertBand(350, 999)]) == ["bands [0, 350] and [350, 999] overlap"]
    assert partition_problems([ExpertBand(0, 349), ExpertBand(350, 998)]) == \
        ["no expert holds t = 999 (highest band is [350, 998])"]
    assert partition_problems([ExpertBand(1, 349), ExpertBand(350, 999)]) == \
        ["no expert holds t = 0 (lowest band is [1, 349])"]
    assert partition_problems([ExpertBand(0, 49, 100), ExpertBand(50, 999)]) == \
        ["experts disagree on num_train_timesteps: [100, 1000]"]


def test_sub_bands_and_fixed_timesteps_keep_the_schedule_and_name_bad_counts() -> None:
    assert sub_bands(ExpertBand(0, 9, 10), 2) == [ExpertBand(0, 4, 10), ExpertBand(5, 9, 10)]
    with pytest.raises(ValueError, match=r"^cannot cut band \[0, 2\] \(3 timesteps\) into 4 sub-bands$"):
        sub_bands(ExpertBand(0, 2), 4)
    with pytest.raises(ValueError, match=r"^count must be >= 1, got 0$"):
        fixed_timesteps(ExpertBand(0, 10), 0)


def test_draws_are_made_on_the_device_asked_for() -> None:
    band = ExpertBand(0, 9, 10)
    assert band.sample(3, device="meta").device.type == "meta"
    assert band.sample(3, device="meta", stratified=True).device.type == "meta"


def test_a_range_with_letters_is_refused_as_not_two_integers() -> None:
    with pytest.raises(ValueError, match=r"^timestep_range='X1,5' is not valid: expected 'LO,HI' with two integers"):
        parse_timestep_range("X1,5")
