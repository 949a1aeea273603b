"""The merge itself: the pure plan, laser, the safetensors and GGUF writers, the model card, a run and a batch of runs."""
