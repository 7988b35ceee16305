"""The mixture plan as one typed value (config/plan.py): parsed and checked when the config is read, each expert's
settings resolved (an entry parsed as the shared option is), a plan that does not fit refused before any model
loads, naming the option and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertune.cli import main
from expertune.config import load_config
from expertune.config.plan import PER_EXPERT, ExpertSettings, MixturePlan, SharedSteps
from expertune.config.schema import TrainConfig
from expertune.errors import ConfigError
from expertune.train.setup import expert_settings


def _plan(*flags: str) -> MixturePlan:
    config, _ = load_config(list(flags))
    plan = config.mixture_plan
    assert plan is not None
    return plan


def test_each_expert_holds_its_own_resolved_settings() -> None:
    plan = _plan("--pretrained_model_name_or_path=/models/base", "--mixture_boundaries=700,350",
                 "--learning_rate=3e-4", "--expert_learning_rates=1e-5,,2e-5", "--expert_models=,/models/refiner,",
                 "--snr_gamma=5", "--expert_loss_weightings=min_snr,none,", "--use_ema", "--expert_ema_decays=0.99",
                 "--mixture_schedule=proportional", "--mixture_switch_every=3")
    assert [b.text for b in plan.boundaries] == ["700", "350"]
    assert (plan.schedule, plan.switch_every, plan.count) == ("proportional", 3, 3)
    assert plan.experts == (
        ExpertSettings(pretrained_model_name_or_path="/models/base", learning_rate=1e-5, loss_weighting="min_snr",
                       ema_decay=0.99),
        ExpertSettings(pretrained_model_name_or_path="/models/refiner", learning_rate=3e-4, loss_weighting="none",
                       ema_decay=0.99),
        # an empty entry is the shared option's value (loss_weighting unset: its own rule, min_snr with snr_gamma)
        ExpertSettings(pretrained_model_name_or_path="/models/base", learning_rate=2e-5, loss_weighting=None,
                       ema_decay=0.99),
    )
    assert plan.model_sources("/models/base", "/loaded/base") == ["/loaded/base", "/models/refiner", "/loaded/base"]


def test_the_per_expert_table_drives_the_settings_and_the_training_section() -> None:
    assert set(PER_EXPERT.values()) == set(ExpertSettings.__dataclass_fields__)
    settings = ExpertSettings(pretrained_model_name_or_path="m", learning_rate=7e-5, loss_weighting="debiased",
                              ema_decay=0.5)
    train = settings.applied_to(TrainConfig(learning_rate=1e-6, ema_decay=0.9))
    assert (train.learning_rate, train.loss_weighting, train.ema_decay) == (7e-5, "debiased", 0.5)
    config, _ = load_config(["--pretrained_model_name_or_path=/m", "--learning_rate=2e-4"])
    assert expert_settings(config, 1) == [ExpertSettings(pretrained_model_name_or_path="/m", learning_rate=2e-4,
                                                         loss_weighting=None, ema_decay=0.9999)]


@pytest.mark.parametrize(("flags", "message"), [
    (["--mixture_boundaries=700,350", "--expert_learning_rates=1e-5,2e-5"],
     r"expert_learning_rates='1e-5,2e-5' \(from command line\) has 2 values for 3 experts: give one value for all, or "
     r"exactly 3"),
    (["--mixture_boundaries=350", "--expert_loss_weightings=min_snr,snr"],
     r"expert_loss_weightings='min_snr,snr'.*'snr' \(from entry 1 of expert_loss_weightings\).*none, min_snr, debiased"),
    (["--mixture_boundaries=350", "--expert_loss_weightings=min_snr,none"],
     r"gives expert 0 min_snr, which needs snr_gamma: add --snr_gamma=5"),
    (["--mixture_boundaries=350", "--expert_learning_rates=-1"], r"expert_learning_rates='-1'.*learning_rate"),
    (["--mixture_boundaries=350", "--expert_ema_decays=0.9,1.5", "--use_ema"], r"expert_ema_decays='0.9,1.5'"),
    (["--mixture_boundaries=350", "--expert_ema_decays=0.9"], r"expert_ema_decays='0.9'.*needs use_ema: add --use_ema"),
    (["--mixture_boundaries=350,700"], r"mixture_boundaries: 700 is not below 350: bands out of order; list the "
                                       r"boundaries highest timestep first"),
    (["--mixture_boundaries=350", "--mixture_shared_steps=10", "--max_train_steps=10"],
     r"mixture_shared_steps=10 is 10 job steps, not shorter than the run \(10 steps\).*Use fewer shared steps"),
    (["--mixture_boundaries=350", "--mixture_shared_steps=1.5"], r"mixture_shared_steps='1.5'.*whole number"),
    (["--mixture_boundaries=350", "--mixture_shared_steps=abc"], r"mixture_shared_steps='abc' is not a number"),
    (["--mixture_shared_steps=0.5"], r"mixture_shared_steps='0.5' \(from command line\).*mixture_boundaries is unset"),
])
def test_a_plan_that_does_not_fit_is_refused_when_the_config_is_read(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags)


def test_the_shared_phase_resolves_a_count_or_a_fraction_of_the_run() -> None:
    assert SharedSteps.parse("0.25").resolve(40) == 10
    assert SharedSteps.parse("12").resolve(40) == 12
    with pytest.raises(ConfigError, match="not shorter than the run"):
        SharedSteps.parse("0.99").resolve(40)  # 40 of 40 steps: the experts would never train apart


def test_the_cli_refuses_a_bad_plan_before_it_reaches_the_model(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    code = main(["train", f"--pretrained_model_name_or_path={missing}", f"--output_dir={tmp_path / 'out'}",
                 f"--data_backend_config={tmp_path / 'none.json'}", "--mixture_boundaries=700,350",
                 "--expert_learning_rates=1e-5,2e-5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("expertune: error:") and "expert_learning_rates" in err and "3 experts" in err
    assert "no-such-model" not in err  # the plan error came first: the model path was never looked at
    assert not (tmp_path / "out").exists()


def test_a_boundary_the_schedule_never_reaches_is_refused_before_any_weights_load(
        tiny_model_dir: Path, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import expertune.train.setup as setup

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the plan was checked")

    monkeypatch.setattr(setup, "load_components", no_load)
    config, _ = load_config(["--report_to=none", f"--pretrained_model_name_or_path={tiny_model_dir}",
                             f"--data_backend_config={small_dataset}", f"--output_dir={tmp_path / 'out'}",
                             "--mixture_boundaries=snr:1e-9"])  # no zero-terminal rescale: the SNR stays above
    with pytest.raises(ConfigError, match=r"mixture plan: boundary 'snr:1e-9': no timestep of the schedule has snr "
                                          r"below 1e-09"):
        setup.setup_run(config)


def _alphas(zero_terminal: bool = True):
    from expertune.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000},
                                                   rescale_betas_zero_snr=zero_terminal or None)
    return schedule.alphas_cumprod


def test_an_overlap_widens_each_band_across_its_boundaries_in_timesteps_or_log_snr() -> None:
    from expertune.mixture import snr_of

    plan = _plan("--mixture_boundaries=700,350", "--mixture_overlap=50")
    assert [(b.lo, b.hi) for b in plan.training_bands(_alphas())] == [(650, 999), (300, 749), (0, 399)]
    assert [(b.lo, b.hi) for b in plan.bands(_alphas())] == [(700, 999), (350, 699), (0, 349)]  # their own bands
    plan = _plan("--mixture_boundaries=350", "--mixture_overlap=snr:0.5")
    high, low = plan.training_bands(_alphas())
    logsnr = snr_of(_alphas()).log()
    # every timestep within 0.5 in log-SNR of the boundary's side, and none further
    assert logsnr[high.lo] - logsnr[350] <= 0.5 < logsnr[high.lo - 1] - logsnr[350]
    assert logsnr[349] - logsnr[low.hi] <= 0.5 < logsnr[349] - logsnr[low.hi + 1]
    assert (high.hi, low.lo) == (999, 0) and high.lo < 350 and low.hi > 349


@pytest.mark.parametrize(("flags", "message"), [
    (["--mixture_boundaries=700,350", "--mixture_overlap=350"],
     r"mixture_overlap=350 is wider than the band \[350, 699\] \(350 timesteps\).*use an overlap below 350"),
    (["--mixture_boundaries=350", "--mixture_overlap=2.5"], r"mixture_overlap='2.5': give a whole number"),
    (["--mixture_boundaries=350", "--mixture_overlap=db:3"], r"mixture_overlap='db:3': write a number of timesteps"),
    (["--mixture_overlap=50"], r"mixture_overlap='50' \(from command line\).*mixture_boundaries is unset"),
    (["--mixture_boundaries=700,350", "--mixture_handoff_blend=350"],
     r"mixture_handoff_blend=350 is not shorter than the narrowest band .*\(350 timesteps\): use a window below 350"),
    (["--mixture_handoff_blend=10"], r"mixture_handoff_blend=10 \(from command line\).*mixture_boundaries is unset"),
])
def test_an_overlap_that_does_not_fit_is_refused_when_the_config_is_read(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags)


def test_an_overlap_or_blend_known_only_on_the_schedule_is_refused_when_the_bands_are() -> None:
    plan = _plan("--mixture_boundaries=snr:0.5", "--mixture_overlap=snr:30")
    with pytest.raises(ConfigError, match=r"mixture_overlap=snr:30: .*wider than a neighbouring band.*use a smaller"):
        plan.training_bands(_alphas())
    plan = _plan("--mixture_boundaries=snr:0.5", "--mixture_handoff_blend=900")
    with pytest.raises(ConfigError, match=r"mixture_handoff_blend=900 is not shorter than the narrowest band"):
        plan.check_blend(plan.bands(_alphas()))


def test_expert_and_mixture_files_record_the_training_range(tmp_path: Path) -> None:
    from expertune.expert_format import ExpertDescription, MixtureMember
    from expertune.experts import ExpertBand
    from expertune.errors import ModelError

    band, wide = ExpertBand(0, 349), ExpertBand(0, 399)
    description = ExpertDescription(band, {"num_train_timesteps": 1000}, training_band=wide)
    description.write(tmp_path)
    assert ExpertDescription.read(tmp_path).training_band == wide
    assert MixtureMember("expert-1/pipeline", band, "full", wide).to_json()["training_timestep_range"] == [0, 399]
    assert "training_timestep_range" not in ExpertDescription(band, {"num_train_timesteps": 1000}).to_json()
    ExpertDescription(band, {"num_train_timesteps": 1000}, training_band=ExpertBand(10, 349)).write(tmp_path)
    with pytest.raises(ModelError, match=r"training_timestep_range .* does not hold the expert's band"):
        ExpertDescription.read(tmp_path)
