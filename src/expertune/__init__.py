"""expertune: timestep-split mixtures of diffusion experts for SDXL-family models."""
import logging as _logging

__version__ = "0.1.0"

# torchao (base_model_precision=int8-torchao, issue 23) is imported by peft whenever it is installed, and then logs
# a warning for each CUDA extension a CPU-only torch cannot load (and torch one per enum it registers): not problems.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
