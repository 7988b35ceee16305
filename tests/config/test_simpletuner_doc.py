"""docs/from-simpletuner.md lists every SimpleTuner option with what expertune does, from the one table."""

from __future__ import annotations

from pathlib import Path

from expertune.config.simpletuner_doc import fate, mapping_table, simpletuner_names
from expertune.config.simpletuner_flags import OPTIONS

REPO = Path(__file__).resolve().parents[2]


def test_every_simpletuner_option_has_a_fate() -> None:
    names = simpletuner_names()
    assert len(names) > 450 and set(OPTIONS) <= set(names)
    assert [n for n in names if fate(n)[0] == "unknown"] == []
    for name in ("checkpointing_steps", "validation_steps", "user_prompt_library"):
        assert fate(name)[0] == "alias"
    assert fate("validation_torch_compile")[0] == "ignored" and fate("push_to_hub")[0] == "works" and fate("model_card_note")[0] == "ignored (warning)"
    assert fate("noise_offset")[0] == fate("seed")[0] == "works"


def test_the_page_ends_with_the_generated_table() -> None:
    page = (REPO / "docs" / "from-simpletuner.md").read_text(encoding="utf-8")
    assert page.endswith(mapping_table())
    for name in simpletuner_names():
        assert f"| `--{name}` |" in page
