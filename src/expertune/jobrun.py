"""The process a UI job runs in: `python -m expertune.jobrun RESULT_FILE VERB ARGS...` runs one of expertune's
own verbs (never anything else) and writes its exit code to RESULT_FILE, so a UI started later still learns how
the job ended. Started in a session of its own, it outlives the UI that started it. It sits beside cli.py, above
ui/ (which starts it by name and never imports it), so that no package imports one that imports it back."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from expertune.ui.jobs import VERBS


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in VERBS:
        print(f"expertune: error: a UI job runs one of {', '.join(VERBS)}; got {argv[1:2]}", file=sys.stderr)
        return 2
    result, verb_argv = Path(argv[0]), argv[1:]
    code = 1
    try:
        from expertune.cli import main as expertune_main

        code = expertune_main(verb_argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        from expertune.io_utils import atomic_write_json

        sys.stdout.flush()
        sys.stderr.flush()
        atomic_write_json(result, {"rc": code, "ended": time.time()})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
