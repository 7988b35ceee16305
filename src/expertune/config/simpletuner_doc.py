"""The mapping table of docs/from-simpletuner.md: every SimpleTuner option and what expertune does with it,
generated from the option fields (schema), the ignored-option table and the flag table (simpletuner_flags).

`python -m expertune.config.simpletuner_doc` prints it; tests/config/test_simpletuner_doc.py checks the page.
"""

from __future__ import annotations

from pathlib import Path

from expertune.config.schema import FIELDS
from expertune.config.simpletuner_flags import OFF, OPTIONS, lookup

NAMES_FILE = Path(__file__).with_name("simpletuner_options.txt")


def simpletuner_names() -> list[str]:
    """SimpleTuner's option names (its OPTIONS.md, stored beside this module) and the older spellings of the
    flag table, sorted."""
    listed = [line.strip() for line in NAMES_FILE.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")]
    return sorted(set(listed) | set(OPTIONS))


def fate(name: str) -> tuple[str, str]:
    """(what expertune does, the detail) for a SimpleTuner option; ("unknown", "") for a name it does not know."""
    if name in FIELDS:
        unsupported = FIELDS[name].unsupported
        detail = "the same option" + (f"; refused when {unsupported.when}: {unsupported.message}" if unsupported else "")
        if name == "validation_prompt_library":
            detail = "a prompt-library file; SimpleTuner's true/false switch of this name is ignored (use user_prompt_library)"
        return "works", detail
    row = lookup(name)
    if row is None:
        return "unknown", ""
    if row.action == "alias":
        return "alias", f"`{row.target}`" + (f" = `{row.on_value}` when true" if row.on_value else "")
    if row.action == "refuse":
        allowed = sorted({q for q in row.quiet if q not in OFF} | {"false / 0 / empty"})
        return "refused", f"{row.reason} (accepted: {', '.join(allowed)})"
    return "ignored" + (" (warning)" if row.warn else ""), row.reason


def mapping_table() -> str:
    """The Markdown table: one row per SimpleTuner option."""
    lines = ["| SimpleTuner option | expertune | detail |", "|---|---|---|"]
    for name in simpletuner_names():
        what, detail = fate(name)
        lines.append(f"| `--{name}` | {what} | {detail} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(mapping_table(), end="")
