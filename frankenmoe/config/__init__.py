"""The merge config: its dataclasses (the one schema), the YAML parser and the generated JSON Schema."""
