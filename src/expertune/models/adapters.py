"""Adapter kinds of LoRA experts: standard LoRA, DoRA, and the LyCORIS family that peft provides (LoHa, LoKr).

`lora_type=standard` trains peft LoRA adapters (`use_dora` makes them DoRA: Liu et al. 2024, a learned magnitude
per output feature beside the low-rank direction update). `lora_type=lycoris` reads SimpleTuner's
`lycoris_config` JSON, whose `algo` chooses the adapter:

| algo | peft config | JSON fields read (LyCORIS' names) |
|---|---|---|
| lora | LoraConfig | linear_dim (rank), linear_alpha, dropout, dora_wd (DoRA) |
| loha | LoHaConfig (Hadamard product of two low-rank pairs) | linear_dim, linear_alpha, rank_dropout, module_dropout, use_tucker |
| lokr | LoKrConfig (Kronecker product; `factor` splits the dimensions) | the same, and factor, decompose_both |

`multiplier` must be 1 (the strength is applied at inference); `apply_preset` / `preset` are accepted and not used:
the adapted modules are `lora_target_modules`. Any other field, or another algo (LyCORIS' locon, ia3, glora,
diag-oft, full, ...), is refused naming what is supported. Parsing needs neither torch nor peft, so a bad file is
refused before any model loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from expertune.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftConfig

log = logging.getLogger(__name__)

LYCORIS_ALGOS = ("lora", "loha", "lokr")
_COMMON = ("algo", "multiplier", "linear_dim", "linear_alpha", "apply_preset", "preset")
LYCORIS_FIELDS: dict[str, tuple[str, ...]] = {
    "lora": (*_COMMON, "dropout", "dora_wd"),
    "loha": (*_COMMON, "rank_dropout", "module_dropout", "use_tucker"),
    "lokr": (*_COMMON, "rank_dropout", "module_dropout", "use_tucker", "factor", "decompose_both"),
}


@dataclass(frozen=True)
class AdapterSpec:
    """The adapters one LoRA expert trains."""

    algo: str = "lora"  # lora | loha | lokr
    rank: int = 16
    alpha: float | None = None  # None: equal to the rank (a scale of 1)
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    dropout: float = 0.0  # lora only
    use_dora: bool = False  # lora only
    rank_dropout: float = 0.0  # loha / lokr
    module_dropout: float = 0.0  # loha / lokr
    use_tucker: bool = False  # loha / lokr: peft's use_effective_conv2d
    factor: int = -1  # lokr: peft's decompose_factor (-1: the most balanced split)
    decompose_both: bool = False  # lokr

    @property
    def in_diffusers_layout(self) -> bool:
        """LoRA and DoRA save as diffusers' LoRA file; LoHa and LoKr in peft's layout."""
        return self.algo == "lora"

    def peft_config(self) -> PeftConfig:
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        alpha = self.alpha or self.rank
        targets = list(self.target_modules)
        if self.algo == "lora":
            return LoraConfig(r=self.rank, lora_alpha=alpha, lora_dropout=self.dropout, target_modules=targets,
                              init_lora_weights=True, use_dora=self.use_dora)
        common: dict[str, Any] = dict(r=self.rank, alpha=alpha, rank_dropout=self.rank_dropout,
                                      module_dropout=self.module_dropout, use_effective_conv2d=self.use_tucker,
                                      target_modules=targets, init_weights=True)
        if self.algo == "loha":
            return LoHaConfig(**common)
        return LoKrConfig(**common, decompose_factor=self.factor, decompose_both=self.decompose_both)

    def describe(self) -> dict[str, Any]:
        """What expert.json records of the adapters."""
        name = "dora" if self.use_dora else self.algo
        return {"adapter": name, "rank": self.rank, "alpha": self.alpha or self.rank}


def _field(document: dict[str, Any], name: str, kind: type, default: Any, source: str) -> Any:
    value = document.get(name, default)
    ok = isinstance(value, bool) if kind is bool else (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                      and (kind is float or float(value).is_integer()))
    if not ok:
        raise ConfigError(f"{source}: {name}={value!r} is not a{'n integer' if kind is int else ' ' + kind.__name__}")
    return kind(value)


def read_lycoris_config(path: str | Path, rank: int, alpha: float | None, dropout: float,
                        target_modules: tuple[str, ...]) -> AdapterSpec:
    """The AdapterSpec of a LyCORIS JSON file (`rank`, `alpha`, `dropout`: what fields it leaves out default to);
    ConfigError naming the file, the field and what is supported."""
    source = f"lycoris_config {path}"
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{source}: cannot read it ({error.strerror or error}); give the path of a LyCORIS "
                          "JSON file, e.g. {\"algo\": \"lokr\", \"linear_dim\": 16, \"linear_alpha\": 16}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source} must hold a JSON object with an \"algo\"")
    algo = document.get("algo")
    if algo not in LYCORIS_ALGOS:
        raise ConfigError(f"{source}: algo={algo!r} is not supported; expertune trains the LyCORIS algorithms peft "
                          f"provides: {', '.join(LYCORIS_ALGOS)}")
    unknown = sorted(set(document) - set(LYCORIS_FIELDS[algo]))
    if unknown:
        raise ConfigError(f"{source}: field(s) {', '.join(unknown)} are not supported with algo={algo}; the fields "
                          f"read are {', '.join(LYCORIS_FIELDS[algo])}")
    if _field(document, "multiplier", float, 1.0, source) != 1.0:
        raise ConfigError(f"{source}: multiplier={document['multiplier']!r}: training uses 1.0 (set the strength "
                          "when you load the adapter); remove it or set 1.0")
    if "apply_preset" in document or "preset" in document:
        log.warning("%s: apply_preset / preset are not used; the adapted modules are lora_target_modules (%s)",
                    source, ",".join(target_modules))
    spec_rank = _field(document, "linear_dim", int, rank, source)
    spec_alpha = _field(document, "linear_alpha", float, alpha if alpha is not None else spec_rank, source)
    if spec_rank < 1 or spec_alpha <= 0:
        raise ConfigError(f"{source}: linear_dim must be >= 1 and linear_alpha > 0")
    return AdapterSpec(
        algo=algo, rank=spec_rank, alpha=spec_alpha, target_modules=target_modules,
        dropout=_field(document, "dropout", float, dropout, source),
        use_dora=_field(document, "dora_wd", bool, False, source),
        rank_dropout=_field(document, "rank_dropout", float, 0.0, source),
        module_dropout=_field(document, "module_dropout", float, 0.0, source),
        use_tucker=_field(document, "use_tucker", bool, False, source),
        factor=_field(document, "factor", int, -1, source),
        decompose_both=_field(document, "decompose_both", bool, False, source))


def target_modules(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def adapter_spec(m: object) -> AdapterSpec:
    """The adapters a LoRA expert of model config `m` (config.schema.ModelConfig: typed as `object` so that models/
    does not import config/, which imports it) trains (lora_type, use_dora, lycoris_config)."""
    return adapter_spec_from_values({name: getattr(m, name) for name in _SPEC_FIELDS})


_SPEC_FIELDS = ("lora_type", "lycoris_config", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
                "use_dora")


def adapter_spec_from_values(values: Mapping[str, Any]) -> AdapterSpec:
    """`adapter_spec` from flat option values (the config check runs it before the Config exists)."""
    targets = target_modules(values["lora_target_modules"])
    if values["lora_type"] == "lycoris":
        if values["lycoris_config"] is None:
            raise ConfigError("lora_type=lycoris needs lycoris_config: the path of a LyCORIS JSON file, e.g. "
                              "{\"algo\": \"lokr\", \"linear_dim\": 16, \"linear_alpha\": 16, \"factor\": 8}")
        return read_lycoris_config(values["lycoris_config"], values["lora_rank"], values["lora_alpha"],
                                   values["lora_dropout"], targets)
    return AdapterSpec("lora", values["lora_rank"], values["lora_alpha"], targets, dropout=values["lora_dropout"],
                       use_dora=values["use_dora"])
