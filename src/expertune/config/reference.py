"""The option reference, rendered from the schema's field definitions: docs/configuration.md and
`expertune train --help`."""

from __future__ import annotations

from typing import Any

from expertune.config.schema import FIELDS, IGNORED_OPTIONS, REQUIRED_FOR_TRAINING, SECTIONS, UNSUPPORTED, FieldSpec
from expertune.config.simpletuner import TEMPLATE_VARIABLES
from expertune.config.simpletuner_flags import OPTIONS

INTRO = """\
# Configuration reference

<!-- Generated from src/expertune/config/schema.py: python -m expertune.config.reference > docs/configuration.md
     (tests/config/test_schema.py fails when this file and the schema disagree). -->

Every option has one name, used as the command-line flag (`--name`), as the key in a TOML file and in
`run.json`. Options are grouped in sections ({sections})
but names are unique, so the sections never appear in what you write.

## Where settings come from

Lowest precedence first; a later source overrides an earlier one option by option:

1. the defaults below;
2. a config file given with `--config FILE`: TOML, or SimpleTuner's config.json / config.toml (a `.env` file
   given here is read as config.env);
3. a SimpleTuner-style `config.env` file given with `--env FILE`;
4. flags on the command line.

With neither `--config` nor `--env`, `train` and `cache` read the file SimpleTuner would find: `CONFIG_PATH`,
else `config/` (or `config/<ENV>/`) holding `config.json`, `config.toml` or `config.env`, in that order or as
`CONFIG_BACKEND` says. SimpleTuner's other spellings of options (`--checkpointing_steps`, `--validation_steps`,
`--user_prompt_library`, ...) are accepted in every source; options with no expertune equivalent are ignored
with their reason or refused: every SimpleTuner option is listed in [from-simpletuner.md](from-simpletuner.md).

Within one source the last occurrence wins. Inside config.env, the flags in `TRAINER_EXTRA_ARGS` override
the other variables (SimpleTuner appends them last). `--config` and `--env` may each be given once, only on
the command line. The process environment is never read as settings; it only supplies `$VAR` values that
config.env itself does not set.

### Command line

`--name=value`, `--name value`, or a bare `--name` for a boolean (same as `--name=true`).
Unknown options are errors, with a "did you mean" suggestion when one is close.

### TOML and SimpleTuner's config.json / config.toml (`--config`)

A flat file of `name = value` lines at the top level (no tables), or SimpleTuner's flat JSON object. Keys may
carry SimpleTuner's leading `--`. Values may be numbers, booleans or strings; strings are converted as on the
command line (`"true"`, `"500"`, `"1e-4"`); in JSON `null` or `""` sets nothing. `.json` files are JSON, `.env`
files config.env, others TOML (or JSON when they start with `{`). An unknown key is an error naming the key and
file.

### config.env (`--env`)

The file is read the way a shell reads plain assignments: `export VAR=value` or `VAR=value`, `#` comments,
blank lines, backslash line continuation, unquoted values, `'single quotes'` (literal) and
`"double quotes"` (with `\\$ \\" \\\\` escapes). `$VAR`, `${VAR}`, `${VAR:-word}` and `${VAR-word}` expand
(unquoted or in double quotes) to the value set earlier in the file, else the process environment, else
empty; a leading `~/` is the home directory. A variable set twice keeps its last value, so
`export TRAINER_EXTRA_ARGS="${TRAINER_EXTRA_ARGS} --more"` appends. Commands, `$(...)`, backticks, pipes
and redirections are syntax errors naming the file and line.

Each variable in the tables below sets its option. `TRAINER_EXTRA_ARGS` and `DEBUG_EXTRA_ARGS` are split into
words like a shell command line and read as flags (`DEBUG_EXTRA_ARGS` first, then `TRAINER_EXTRA_ARGS`, as in
SimpleTuner's train.sh). A boolean variable set to `true` (or `1`, `yes`, `on`) sets the option;
`false` (or `0`, `no`, `off`) adds nothing, as in SimpleTuner, so it does not override a TOML value.
A variable set to the empty string sets nothing. `USE_BITFIT=true` means `layer_freeze_strategy=bitfit`.
Process-environment variables (`TOKENIZERS_PARALLELISM`, `CUDA_VISIBLE_DEVICES`, `HF_*`, `WANDB_*`, ...) are
exported to the run's environment. A variable only read by other variables' `${...}` expansions (a helper such
as `BASE_DIR`) draws no message. The other variables of SimpleTuner's config.env template are listed under
[SimpleTuner template variables](#simpletuner-template-variables). Any other variable is ignored with a warning
naming it and the file.

### Values

- Booleans: `true/false`, `1/0`, `yes/no`, `on/off` (any case).
- An optional option (default "unset") is unset by an empty value (`--name=`).
- Bad values, unknown names and unsupported features stop the run with exit code 2 and a message naming
  the option, the value, where it came from and what is allowed.
- `timestep_range` and `refiner_training` both choose the timestep band: use one.
  `refiner_training_invert_schedule` needs `refiner_training`.

### Required for training

`expertune train` needs {required}; other verbs may not.

### Training length

`max_train_steps` wins over `num_train_epochs`; with both unset the trainer runs one epoch. `0` for either
means unset (SimpleTuner's `MAX_NUM_STEPS=0` "use epochs").

## Options
"""


def _fmt_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _fmt_env(spec: FieldSpec) -> str:
    if not spec.env:
        return "—"
    names = ", ".join(f"`{e}`" for e in spec.env)
    return names + (f" (true → `{spec.env_true_value}`)" if spec.env_true_value else "")


_LIMITED = " See [Unsupported features](#unsupported-features)."

EXPORTS = """\
## Exports

A run saves its expert(s) as diffusers folders with `expert.json` (and `mixture.json`); `export_format` adds
`single_file`: `OUTPUT_DIR/single_file/` gets one `.safetensors` per full expert in the original SDXL checkpoint
layout that ComfyUI and A1111 load (`<run>-t<lo>-<hi>.safetensors`, `<run>-expert-<k>-t<lo>-<hi>.safetensors` in a
mixture), a kohya-layout `..._lora.safetensors` per LoRA expert, and `workflow_api.json`: the ComfyUI chain (API
format) of every expert, one `KSamplerAdvanced` per expert handing over at its band's step. The file says how it
samples: a v-prediction expert holds the empty tensors `v_pred` (and `ztsnr` with zero-terminal SNR) that ComfyUI
detects, `modelspec.prediction_type` / `modelspec.timestep_range` metadata, and an A1111 `.yaml` beside it with
`parameterization: "v"`. `export_precision` sets the single files' weights (fp32, fp16, bf16). In the workflow a
LoRA expert is a `LoraLoader` over its base model's checkpoint, named `<base model name>.safetensors` (rename it
to your copy's file name); a refiner-layout expert encodes its prompt with `CLIPTextEncodeSDXLRefiner`.

Ctrl-C or SIGTERM saves a checkpoint and then (`export_on_interrupt`, on by default) exports the experts as they
are, in `export_format`. `expertune export CHECKPOINT_OR_OUTPUT_DIR` does the same later from any checkpoint
(docs/usage.md).

`pretrained_model_name_or_path` (and an `expert_models` entry) may be a single-file `.safetensors` of the SDXL,
SSD-1B or refiner layout: it is converted once (diffusers' `from_single_file`, offline) into a diffusers folder
under `cache_dir/single_file/`, which is the model from then on. expertune ships the three families' configs but
not the CLIP tokenizers' BPE vocabulary: they come from `single_file_config` (any diffusers folder of the same
family; its configs are used too, which a fine-tune of another shape needs) or from the official repository's
copy in the local Hugging Face cache; without either the run stops naming both. `revision` and `variant` apply
to every model read from the hub: the pretrained model, `expert_models` entries, the export's reload.
"""


def render() -> str:
    required = ", ".join(f"`{n}` (`{'`/`'.join(FIELDS[n].env)}`)" for n in REQUIRED_FOR_TRAINING)
    sections = ", ".join(f"`{name}`" for name in SECTIONS)
    out = [INTRO.replace("{required}", required).replace("{sections}", sections)]
    for section, cls in SECTIONS.items():
        out += [f"### `{section}`: {cls.__doc__}", "",
                "| option | config.env | type | default | allowed | description |",
                "|---|---|---|---|---|---|"]
        for spec in FIELDS.values():
            if spec.section == section:
                out.append(f"| `{spec.name}` | {_fmt_env(spec)} | {spec.type_name} | {_fmt_default(spec.default)} "
                           f"| {spec.allowed_text()} | {spec.doc}{_LIMITED if spec.unsupported else ''} |")
        out.append("")
    out += [EXPORTS]  # issue 19 (export)
    out += ["## Recognised but ignored", "",
            "These SimpleTuner options with a config.env variable have no expertune equivalent. They are accepted "
            "as the variable, a flag or a TOML key and ignored with a warning (silently when the value is empty or "
            "`false`). Every other SimpleTuner option is listed in [from-simpletuner.md](from-simpletuner.md).", "",
            "| option | config.env | reason |", "|---|---|---|"]
    out += [f"| `{flag}` | `{env}` | {OPTIONS[flag].reason} |" for flag, env in IGNORED_OPTIONS.items()]
    out += ["", "## SimpleTuner template variables", "",
            "Variables of SimpleTuner's mid-2024 config.env template that set no option. `ignore`: a value that is "
            "not empty or false logs one line with the reason (a warning where marked); `refuse`: a true value "
            "stops the run with exit code 2.", "",
            "| variable | action | reason |", "|---|---|---|"]
    out += [f"| `{row.name}` | {row.action}{' (warning)' if row.warn else ''} | {row.reason}"
            f"{f' (silent unless `{row.only_with}` is on)' if row.only_with else ''} |"
            for row in TEMPLATE_VARIABLES.values()]
    out += ["", "## Unsupported features", "",
            "Asking for one of these stops the run with exit code 2 and the message shown.", "",
            "| option | when | message |", "|---|---|---|"]
    out += [f"| `{row.name}` | {row.when} | {row.message} |" for row in UNSUPPORTED]
    return "\n".join(out) + "\n"


def render_markdown_reference() -> str:
    """The text of docs/configuration.md, generated from FIELDS (and the SimpleTuner tables)."""
    return render()


def options_help() -> str:
    """Every option by section, with its default, allowed values and doc line: `expertune train --help`."""
    out = ["every setting, by section (flag, TOML key and run.json name; later sources win: "
           "TOML < config.env < flags):"]
    for section, cls in SECTIONS.items():
        out += ["", f"{section}: {cls.__doc__}"]
        for spec in FIELDS.values():
            if spec.section == section:
                default = "unset" if spec.default is None else repr(spec.default)
                facts = [f"default {default}", spec.allowed_text()]
                if spec.required_for_training:
                    facts.append("required")
                if spec.unsupported:
                    facts.append("refused when " + spec.unsupported.when.replace("`", ""))
                out.append(f"  {spec.flag}  ({'; '.join(facts)})")
                out.append(f"      {spec.doc}")
    return "\n".join(out)


if __name__ == "__main__":  # python -m expertune.config.reference > docs/configuration.md
    print(render(), end="")
