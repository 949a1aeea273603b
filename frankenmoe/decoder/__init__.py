"""The one streamed decoder: embeddings, attention, MoE/MLP blocks and text generation, one layer in memory at a time."""
