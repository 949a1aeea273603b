"""Model families as data: tensor roles and named dimensions, source families, output architectures, GGUF tables."""
