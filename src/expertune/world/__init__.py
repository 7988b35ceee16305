"""The tiny world: a procedural captioned image domain and the pretrained model of it shipped with expertune."""

from pathlib import Path

# The committed world model: base/ (an SDXL-layout pipeline), clip/ (the evaluation CLIP), manifest.json.
PRETRAINED = Path(__file__).resolve().parent / "pretrained"
