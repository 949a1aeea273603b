"""Process-wide state: the allocator policy, Ctrl-C/SIGTERM handling, and the one adapter for private torch/transformers names."""
