"""The files of a Hugging Face model folder (local or a Hub repo) that frankenmoe reads, by name and pattern."""

from __future__ import annotations

CONFIG_FILE = "config.json"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Pickle files read as weights when a folder has no safetensors, by preference. Other pickles beside them
# (training_args.bin, optimizer.pt, *.ckpt) are training state, not weights, and are never opened.
WEIGHT_PICKLE_PATTERNS = (("pytorch_model*.bin",), ("*.pt", "*.pth"))
ADAPTER_CONFIG = "adapter_config.json"
# A PEFT adapter's matrices (adapter_model.safetensors / .bin) are not a model's weights.
ADAPTER_WEIGHTS_PREFIX = "adapter_model."
