"""The mutation score of `make mutation`: read mutmut's results under mutants/ and print them per module, the
mutants that were not killed, and last the score (killed / total, as a percentage). docs/testing.md explains them.

Killed: a selected unit test failed (or timed out) with the mutant in place. Every other outcome (survived, no test
reached the mutated function, not run) counts against the score. Exit 1 when no results are found.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

KILLED_CODES = {1, 3, 36, 24, -24, 152, 255, 37}  # mutmut's exit codes for killed, timeout, type-checked
NAMES = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.rglob("*.py.meta"))
    total = Counter[str]()
    killed = Counter[str]()
    left: list[tuple[str, str]] = []
    for meta in metas:
        module = str(meta.relative_to(root / "src")).removesuffix(".meta")
        codes: dict[str, int | None] = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        for name, code in sorted(codes.items()):
            total[module] += 1
            if code in KILLED_CODES:
                killed[module] += 1
            else:
                left.append((name, NAMES.get(code, f"exit code {code}")))
    if not total:
        print("no mutation results under mutants/: run `make mutation`", file=sys.stderr)
        return 1
    for module in sorted(total):
        print(f"{module:34s} {killed[module]:5d} / {total[module]:5d} killed  "
              f"({100 * killed[module] / total[module]:.1f} %)")
    for name, status in left:
        print(f"  not killed: {name} ({status})")
    all_killed, all_total = sum(killed.values()), sum(total.values())
    print(f"mutation score: {all_killed} / {all_total} killed = {100 * all_killed / all_total:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
