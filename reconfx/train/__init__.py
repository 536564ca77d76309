"""Multi-task training: per-task gradients, aggregation with torchjd, the training loop."""
