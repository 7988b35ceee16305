"""Exporting experts: checkpoints as experts, single-file layouts for ComfyUI / A1111, the ComfyUI chain."""
