"""Loading, validating and saving SDXL-family models, and the tiny SDXL-layout factory."""
