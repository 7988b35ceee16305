"""The embedded default: a tiny model, a small captioned dataset, and both experts trained on it."""
