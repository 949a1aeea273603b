"""A MoE output folder: the rules for OUT, staging and the atomic swap, recovery after a killed merge, opening a
checkpoint, its manifest and model-card recipe."""
