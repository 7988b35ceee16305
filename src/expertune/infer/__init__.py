"""Inference: chains of experts."""
