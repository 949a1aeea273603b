"""Build Mixtral-format Mixture-of-Experts checkpoints from dense fine-tunes of one base model."""

__version__ = "0.1.0"
