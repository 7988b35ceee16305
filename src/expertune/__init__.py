"""expertune: timestep-split mixtures of diffusion experts for SDXL-family models."""
__version__ = "0.1.0"
