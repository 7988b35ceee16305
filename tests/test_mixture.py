"""The mixture plan: boundaries (timesteps, SNR and log-SNR thresholds on the real schedule), bands that tile
the schedule, refusals, per-expert values and the rules that say which expert trains each step."""

from __future__ import annotations

import math

import pytest
import torch

from expertune.config import load_config
from expertune.errors import ConfigError
from expertune.experts import ExpertBand, partition_problems
from expertune.mixture import (
    owner_of,
    parse_boundaries,
    parse_boundary,
    per_expert,
    plan_bands,
    snr_of,
    step_owners,
    steps_per_expert,
)
from expertune.schedule import NoiseSchedule, signal_to_noise_ratio

SDXL = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _alphas(zero_snr: bool = False) -> torch.Tensor:
    schedule = NoiseSchedule.from_scheduler_config(SDXL, prediction_type="v_prediction" if zero_snr else None,
                                                   rescale_betas_zero_snr=True if zero_snr else None)
    return schedule.alphas_cumprod


def test_timestep_boundaries_make_len_plus_one_experts_that_tile_the_schedule() -> None:
    bands = plan_bands("700,350", _alphas())
    assert bands == [ExpertBand(700, 999), ExpertBand(350, 699), ExpertBand(0, 349)]
    assert partition_problems(bands) == []
    # The two-expert recipe (--refiner_training_strength 0.35) is the plan with one boundary.
    assert plan_bands("350", _alphas()) == [ExpertBand.from_refiner_flags(1000, True, 0.35, True),
                                            ExpertBand.from_refiner_flags(1000, True, 0.35, False)]


@pytest.mark.parametrize("zero_snr", [False, True])
def test_an_snr_boundary_is_the_first_timestep_whose_snr_on_the_actual_schedule_is_below_it(zero_snr: bool) -> None:
    alphas = _alphas(zero_snr)
    snr = (alphas.double() / (1 - alphas.double())).tolist()  # SNR(t) = ᾱ / (1 - ᾱ), written out
    for threshold in (5.0, 1.0, 0.25, 0.01):
        t = parse_boundary(f"snr:{threshold}").timestep(alphas)
        assert snr[t] < threshold <= snr[t - 1], (threshold, t)
        logt = parse_boundary(f"logsnr:{math.log(threshold)}").timestep(alphas)
        assert logt == t
    # SNR 1 (log-SNR 0, equal signal and noise) falls where ᾱ crosses 1/2.
    t = parse_boundary("logsnr:0").timestep(alphas)
    assert alphas[t] < 0.5 <= alphas[t - 1]
    assert torch.equal(snr_of(alphas), signal_to_noise_ratio(alphas.double()))


def test_zero_terminal_snr_moves_an_snr_boundary_and_the_plan_follows() -> None:
    plain, rescaled = _alphas(False), _alphas(True)
    a, b = parse_boundary("snr:0.05").timestep(plain), parse_boundary("snr:0.05").timestep(rescaled)
    assert a != b  # the rescale lowers every SNR: the threshold is reached at a smaller t
    assert b < a
    bands = plan_bands("snr:0.05,snr:2", rescaled)
    assert bands[0].lo == b and bands[1].hi == b - 1 and partition_problems(bands) == []


def test_a_threshold_the_schedule_never_reaches_is_refused_with_the_lowest_value() -> None:
    with pytest.raises(ValueError, match=r"no timestep of the schedule has snr below 1e-09 \(the lowest is"):
        parse_boundary("snr:1e-9").timestep(_alphas(False))


@pytest.mark.parametrize("text, message", [
    ("350,700", r"700 \(t = 700\) is not below 350 \(t = 350\): bands out of order"),
    ("350,350", r"350 \(t = 350\) is not below 350 \(t = 350\): an empty band"),
    ("1000", r"1000 falls at t = 1000, outside \[1, 999\]"),
    ("snr:5,snr:2", r"snr:2 \(t = \d+\) is not below snr:5 \(t = \d+\)"),
    ("0", "a timestep boundary is a whole number >= 1"),
    ("35.5", "a timestep boundary is a whole number >= 1"),
    ("snr:-1", "an SNR threshold is a positive number"),
    ("sigma:3", "'sigma' is not a kind of boundary"),
    ("700,,350", "no empty entries"),
    ("snr:x", "'x' is not a number"),
])
def test_bad_plans_are_refused_naming_the_boundary(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_bands(text, _alphas())


def test_the_config_refuses_a_plan_with_a_single_expert_band_and_lists_without_a_plan() -> None:
    with pytest.raises(ConfigError, match="mixture_boundaries='700,350'.*drop refiner_training"):
        load_config(["--mixture_boundaries=700,350", "--refiner_training"])
    with pytest.raises(ConfigError, match="drop timestep_range"):
        load_config(["--mixture_boundaries=350", "--timestep_range=0,349"])
    with pytest.raises(ConfigError, match="expert_learning_rates='1e-5,2e-5'.*mixture_boundaries is unset"):
        load_config(["--expert_learning_rates=1e-5,2e-5"])
    with pytest.raises(ConfigError, match="mixture boundary 'snr:'"):
        load_config(["--mixture_boundaries=snr:"])
    config, _ = load_config(["--mixture_boundaries=snr:0.5, 350", "--mixture_schedule=proportional"])
    assert config.mixture.mixture_boundaries == "snr:0.5, 350"


def test_per_expert_values_take_one_for_all_or_one_each() -> None:
    assert per_expert(None, 3, "x", float, 1e-6) == [1e-6] * 3
    assert per_expert("2e-5", 3, "x", float, 1e-6) == [2e-5] * 3
    assert per_expert("1e-5, 2e-5, 3e-5", 3, "x", float, 0.0) == [1e-5, 2e-5, 3e-5]
    with pytest.raises(ValueError, match="x='1,2' has 2 values for 3 experts"):
        per_expert("1,2", 3, "x", float, 0.0)
    with pytest.raises(ValueError, match="'abc' is not valid"):
        per_expert("abc", 2, "x", float, 0.0)


BANDS = [ExpertBand(700, 999), ExpertBand(350, 699), ExpertBand(0, 349)]


def test_alternate_takes_turns_in_chain_order() -> None:
    assert step_owners("alternate", BANDS, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert step_owners("alternate", BANDS, 7, switch_every=2) == [0, 0, 1, 1, 2, 2, 0]


def test_proportional_gives_each_expert_its_share_of_the_timesteps_spread_evenly() -> None:
    owners = step_owners("proportional", BANDS, 1000)
    assert steps_per_expert(owners, 3) == [300, 350, 350]
    for prefix in range(1, 1001):  # never more than one step away from its share at any point
        counts = steps_per_expert(owners[:prefix], 3)
        assert all(abs(c - band.size / 1000 * prefix) < 1 + 1e-9 for c, band in zip(counts, BANDS))


def test_timestep_rule_picks_the_owner_of_a_drawn_timestep_reproducibly() -> None:
    owners = step_owners("timestep", BANDS, 2000, seed=7)
    assert owners == step_owners("timestep", BANDS, 2000, seed=7)
    drawn = torch.randint(0, 1000, (2000,), generator=torch.Generator().manual_seed(7)).tolist()
    assert owners == [owner_of(t, BANDS) for t in drawn]
    shares = steps_per_expert(owners, 3)
    assert all(abs(s / 2000 - b.size / 1000) < 0.04 for s, b in zip(shares, BANDS))
    with pytest.raises(ValueError, match="not one of: alternate, proportional, timestep"):
        step_owners("random", BANDS, 3)


# ---- pinned exactly (docs/testing.md: mutation testing) ----------------------------------------------

def test_proportional_owners_of_small_plans_are_pinned_exactly() -> None:
    """Worked by hand: at step s (1-based) expert k is behind by share_k * s - done_k; the furthest behind trains,
    ties to the earlier expert. No slack: an off-by-one in s or in the tie-break changes these lists."""
    assert step_owners("proportional", BANDS, 10) == [1, 2, 0, 1, 2, 0, 1, 2, 0, 1]
    two = [ExpertBand(8, 9, 10), ExpertBand(0, 7, 10)]  # shares 0.2 and 0.8
    assert step_owners("proportional", two, 10) == [1, 1, 0, 1, 1, 1, 1, 0, 1, 1]
    halves = [ExpertBand(5, 9, 10), ExpertBand(0, 4, 10)]  # a tie at every other step goes to the earlier expert
    assert step_owners("proportional", halves, 6) == [0, 1, 0, 1, 0, 1]


def test_the_timestep_rule_draws_with_seed_0_unless_told() -> None:
    drawn = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    assert step_owners("timestep", BANDS, 8) == [owner_of(t, BANDS) for t in drawn] == [2, 2, 0, 0, 0, 1, 1, 1]


def test_owner_of_a_timestep_outside_every_band_is_refused_naming_the_bands() -> None:
    with pytest.raises(ValueError) as caught:
        owner_of(5, [ExpertBand(6, 9, 10), ExpertBand(0, 4, 10)])
    assert str(caught.value) == "timestep 5 is in none of the bands [6, 9], [0, 4]"
    assert [owner_of(t, BANDS) for t in (0, 349, 350, 699, 700, 999)] == [2, 2, 1, 1, 0, 0]


EXACT = torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64)  # SNR exactly 4, 1 and 0.25


def test_a_threshold_is_strictly_below_and_a_missing_one_names_the_lowest_value() -> None:
    assert parse_boundary("snr:1").timestep(EXACT) == 2  # SNR 1 at t = 1 is not below 1
    assert parse_boundary("logsnr:0").timestep(EXACT) == 2
    assert parse_boundary("snr:1.5").timestep(EXACT) == 1
    assert parse_boundary("2").timestep(EXACT) == 2
    with pytest.raises(ValueError) as caught:
        parse_boundary("snr:0.1").timestep(EXACT)
    assert str(caught.value) == "boundary 'snr:0.1': no timestep of the schedule has snr below 0.1 (the lowest is " \
                                "0.25 at t = 2)"
    with pytest.raises(ValueError) as caught:
        parse_boundary("logsnr:-5").timestep(EXACT)
    assert str(caught.value) == "boundary 'logsnr:-5': no timestep of the schedule has logsnr below -5 (the lowest " \
                                "is -1.386 at t = 2)"


@pytest.mark.parametrize(("text", "message"), [
    ("0", "mixture boundary '0': a timestep boundary is a whole number >= 1"),
    ("1.5", "mixture boundary '1.5': a timestep boundary is a whole number >= 1"),
    ("snr:0", "mixture boundary 'snr:0': an SNR threshold is a positive number"),
    ("logsnr:inf", "mixture boundary 'logsnr:inf': the threshold must be finite"),
    ("x:1", "mixture boundary 'x:1': 'x' is not a kind of boundary; write a timestep (350), snr:X or logsnr:X"),
    ("snr:a", "mixture boundary 'snr:a': 'a' is not a number"),
    ("5,,3", "mixture_boundaries='5,,3': expected a comma-separated list such as '700,350' or 'snr:0.5,snr:5', "
             "with no empty entries"),
])
def test_a_bad_boundary_is_refused_with_its_whole_message(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_boundaries(text)
    assert str(caught.value) == message
    assert parse_boundaries("1") == [parse_boundary("1")] and parse_boundary(" SNR:0.5 ").kind == "snr"


LINEAR = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)  # SNR 99 ... 0.0101 over N = 10


def test_plans_reach_both_ends_of_a_short_schedule_and_keep_its_length() -> None:
    assert plan_bands("9", LINEAR) == [ExpertBand(9, 9, 10), ExpertBand(0, 8, 10)]
    assert plan_bands("1", LINEAR) == [ExpertBand(1, 9, 10), ExpertBand(0, 0, 10)]
    assert plan_bands("snr:0.5,snr:5", LINEAR) == [ExpertBand(7, 9, 10), ExpertBand(2, 6, 10), ExpertBand(0, 1, 10)]


@pytest.mark.parametrize(("text", "message"), [
    ("10", "mixture_boundaries 10: 10 falls at t = 10, outside [1, 9] (each expert needs at least one timestep of "
           "the 10)"),
    ("snr:50,5", "mixture_boundaries snr:50 (t = 1), 5: 5 (t = 5) is not below snr:50 (t = 1): bands out of order; "
                 "list the boundaries highest timestep first, each strictly below the one before (SNR thresholds "
                 "therefore rise: snr:0.5,snr:5)"),
    ("5,5", "mixture_boundaries 5, 5: 5 (t = 5) is not below 5 (t = 5): an empty band; list the boundaries highest "
            "timestep first, each strictly below the one before (SNR thresholds therefore rise: snr:0.5,snr:5)"),
])
def test_a_bad_plan_is_refused_with_its_whole_message(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        plan_bands(text, LINEAR)
    assert str(caught.value) == message


def _sources(boundaries: str, models: str | None) -> list[str]:
    """The model each expert starts from (config/plan.py's MixturePlan.model_sources), the run's own as "base"."""
    flags = ["--pretrained_model_name_or_path=base", f"--mixture_boundaries={boundaries}"]
    config, _ = load_config(flags + ([f"--expert_models={models}"] if models is not None else []))
    assert config.mixture_plan is not None
    return config.mixture_plan.model_sources("base", "base")


def test_expert_sources_take_each_entry_or_the_default() -> None:
    assert _sources("700,350", None) == ["base", "base", "base"]
    assert _sources("700,350", "a,,c") == ["a", "base", "c"]
    assert _sources("350", "one") == ["one", "one"]
    with pytest.raises(ConfigError) as caught:
        _sources("700,350", "a,b")
    assert str(caught.value).startswith("expert_models='a,b' (from command line) has 2 values for 3 experts")


def test_a_single_band_owns_every_step_and_an_unknown_rule_is_named() -> None:
    one = [ExpertBand(0, 9, 10)]
    for rule in ("alternate", "proportional", "timestep"):
        assert step_owners(rule, one, 3) == [0, 0, 0]
    with pytest.raises(ValueError) as caught:
        step_owners("random", BANDS, 3)
    assert str(caught.value) == "mixture_schedule 'random' is not one of: alternate, proportional, timestep"
