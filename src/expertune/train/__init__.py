"""Training: the loop, the loss, optimizers and metrics."""
