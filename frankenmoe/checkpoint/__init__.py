"""A MoE output folder: staging and the atomic swap, opening a checkpoint, its manifest and model-card recipe."""
