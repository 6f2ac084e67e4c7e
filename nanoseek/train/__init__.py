"""Training: pre-training loop, checkpoints, the training guard and the cost meter."""
