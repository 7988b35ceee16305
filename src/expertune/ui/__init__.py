"""`expertune ui` and `expertune report`: a thin web layer over the run folders of a workspace and the verbs.

runs.py reads a run's state (lock, checkpoints, run.json), metrics.py its metrics.jsonl (downsampled),
gallery.py its validation images, jobs.py the queue of child processes, server.py serves it all over HTTP with
safety.py's rules, report.py writes one self-contained page. The page itself is static/ (hand-written, no build).
"""
