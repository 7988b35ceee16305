"""The typed training knobs of issue 23 read from a Config: the loss type and the timestep distribution.

The pure maths lives on the ground floor (losses.py, timestep_dist.py); this module only reads the fields, so
that the config an expert trains under (`Run.config_of`: its `ExpertSettings` applied) gives each expert its own.
"""

from __future__ import annotations

import logging
from typing import Any

from expertune.config import Config
from expertune.errors import ConfigError
from expertune.experts import ExpertBand
from expertune.losses import LossType
from expertune.objective.loss import input_perturbation_strength
from expertune.models.adapters import adapter_spec
from expertune.timestep_dist import TimestepDistribution

log = logging.getLogger(__name__)


def loss_type_for(config: Config) -> LossType:
    t = config.train
    return LossType(t.loss_type, t.huber_schedule, t.huber_c)


def distribution_for(config: Config) -> TimestepDistribution:
    b = config.band
    return TimestepDistribution(b.timestep_distribution, b.logit_mean, b.logit_std, b.timestep_bias_strategy,
                                b.timestep_bias_multiplier, b.timestep_bias_begin, b.timestep_bias_end,
                                b.timestep_bias_portion)


def perturbation_for(config: Config, step: int) -> float:
    """The input perturbation strength at the expert's optimizer step `step` (0 for the first)."""
    t = config.train
    return input_perturbation_strength(t.input_perturbation, t.input_perturbation_steps, step)


def check_distribution(config: Config, band: ExpertBand) -> None:
    """Log the expert's timestep distribution and the share of it its band holds; ConfigError for a band it
    gives no probability."""
    distribution = distribution_for(config)
    if distribution.is_uniform:
        return
    try:
        distribution.in_band(band)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    log.info("timestep distribution %s, conditioned on the band %s (which holds %.3g of it)",
             distribution.describe(), band, distribution.band_share(band))


def knobs_summary(config: Config) -> dict[str, Any]:
    """What expert.json records of how the expert was trained: the knobs that differ from plain training."""
    out: dict[str, Any] = {}
    loss = loss_type_for(config)
    if not loss.is_l2:
        out.update(loss_type=loss.loss_type, huber_schedule=loss.huber_schedule, huber_c=loss.huber_c)
    distribution = distribution_for(config)
    if not distribution.is_uniform:
        out["timestep_distribution"] = distribution.describe()
    if config.train.input_perturbation > 0:
        out.update(input_perturbation=config.train.input_perturbation,
                   input_perturbation_steps=config.train.input_perturbation_steps)
    if config.data.flip_images:
        out["flip_images"] = True
    if config.model.model_type == "lora":
        out.update(adapter_spec(config.model).describe())
    return out
