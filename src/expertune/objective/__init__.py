"""The training objective, shared by training and evaluation: the denoising loss and its weighting over the
schedule. It sits below both `train` and `validate`, so neither owns it."""
