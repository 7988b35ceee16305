"""docs/memory.md and `expertune init` agree with the code that computes the memory table from the layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertune.models.memory import STORED, estimate, layout_cost, memory_table, stored_costs

REPO = Path(__file__).resolve().parents[2]


def test_docs_memory_holds_the_generated_tables() -> None:
    assert memory_table() in (REPO / "docs" / "memory.md").read_text(encoding="utf-8")


def test_estimates_add_up_from_the_layout() -> None:
    ssd, sdxl = layout_cost("ssd-1b"), layout_cost("sdxl")
    assert 1.2e9 < ssd.parameters < 1.4e9 and 2.5e9 < sdxl.parameters < 2.7e9  # SSD-1B 1.3B, SDXL 2.6B
    assert ssd.activations_checkpointed < ssd.activations / 4
    full = estimate("ssd-1b", "adamw", batch_size=2, gradient_checkpointing=False, mixed_precision="no")
    assert full.weights == full.gradients == 4 * ssd.parameters and full.optimizer_state == 8 * ssd.parameters
    assert full.activations == 2 * ssd.activations
    assert estimate("ssd-1b", "adamw_bf16").weights == 2 * ssd.parameters


@pytest.mark.integration
def test_stored_layout_costs_are_what_the_layouts_give() -> None:
    assert stored_costs() == STORED.read_text(encoding="utf-8")
