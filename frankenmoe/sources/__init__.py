"""Source models: resolving a reference (folder or Hugging Face repo), their shapes and weights, LoRA adapters, trunk merges."""
