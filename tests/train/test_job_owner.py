"""Who trains each step of a mixture job: the plan's owner of that very step (mixture.py), never its neighbour's."""

from __future__ import annotations

from types import SimpleNamespace

from expertune.experts import ExpertBand
from expertune.mixture import step_owners
from expertune.train.setup import Run

BANDS = [ExpertBand(700, 999), ExpertBand(350, 699), ExpertBand(0, 349)]


def _run(owners: list[int]) -> Run:
    experts = [SimpleNamespace(index=k, state=SimpleNamespace(step=0)) for k in range(3)]
    fields = dict.fromkeys(("config", "accelerator", "output_dir", "components", "schedule", "prepared", "identity",
                            "total_steps", "config_snapshot", "checkpoint_path", "metrics", "started"))
    return Run(**fields, experts=experts, owners=owners)  # type: ignore[arg-type]


def test_each_job_step_trains_the_owner_the_plan_gives_that_step() -> None:
    for rule in ("alternate", "proportional", "timestep"):
        owners = step_owners(rule, BANDS, 12, seed=3)
        run = _run(owners)
        trained = []
        for _ in range(12):
            expert = run.next_expert()
            trained.append(expert.index)
            expert.state.step += 1  # the step is done: the job has advanced by one
        assert trained == owners, rule
    assert _run([2, 0]).next_expert().index == 2  # the very first step is the plan's first owner


def test_a_single_expert_job_always_trains_its_expert() -> None:
    run = _run([])
    assert run.next_expert() is run.experts[0]
    run.experts[0].state.step = 5
    assert run.next_expert() is run.experts[0]
