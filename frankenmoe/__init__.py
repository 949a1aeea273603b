"""Build Mixture-of-Experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) from dense fine-tunes of one base model.

The public API (frankenmoe.api) is imported on first use, so `import frankenmoe` and
`frankenmoe --version` stay fast:

    >>> import frankenmoe
    >>> result = frankenmoe.merge("configs/toy-2x.yaml", "out/")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_API = {
    "load_config": "frankenmoe.api",
    "plan_merge": "frankenmoe.api",
    "run_merge": "frankenmoe.api",
    "merge": "frankenmoe.api",
    "inspect": "frankenmoe.api",
    "route": "frankenmoe.api",
    "compute_routers": "frankenmoe.api",
    "verify": "frankenmoe.api",
    "build": "frankenmoe.api",
    "convert_to_gguf": "frankenmoe.api",
    "evaluate": "frankenmoe.api",
    "EvaluationReport": "frankenmoe.api",
    "MergeResult": "frankenmoe.api",
    "PreparedMerge": "frankenmoe.api",
    "RouteResult": "frankenmoe.api",
    "VerifyReport": "frankenmoe.api",
    "BuildReport": "frankenmoe.api",
    "FrankenMoEError": "frankenmoe.errors",
    "ConfigError": "frankenmoe.errors",
    "ModelError": "frankenmoe.errors",
    "OutputError": "frankenmoe.errors",
    "MergeInterruptedError": "frankenmoe.errors",
}
_CLIENT = {
    "DTYPES": "frankenmoe.config.constants",
    "format_bytes": "frankenmoe.io.sizes",
    "interrupt_scope": "frankenmoe.runtime.interrupts",
    "SigtermInterrupt": "frankenmoe.runtime.interrupts",
    "keep_large_buffers_out_of_the_heap": "frankenmoe.runtime.memory",
}
"""What a command-line client needs before (or without) loading torch: the choices of plan_merge's `dtype`
(for help text), the byte formatter of every message, Ctrl-C/SIGTERM handling that cleans up like the CLI's,
and the allocator policy that keeps a merge's peak memory at one layer (see frankenmoe.runtime.memory)."""
__all__ = ["__version__", *_API, *_CLIENT]


def __getattr__(name: str) -> Any:
    module = _API.get(name) or _CLIENT.get(name)
    if module is None:
        raise AttributeError(f"module 'frankenmoe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
