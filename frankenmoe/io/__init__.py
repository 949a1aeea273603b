"""Bytes on disk and over HTTP, with no model knowledge: safetensors, pickled state dicts, remote ranges, hashing."""
