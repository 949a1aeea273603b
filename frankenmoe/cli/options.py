"""Every option more than one command takes, declared once (typer's Annotated form) and reused.

`merge` and `build` share all the options that decide what a merge writes, so that a config built in
CI is byte for byte what `frankenmoe merge` makes of it; the values are checked by the API
(frankenmoe.api.plan_options), not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from frankenmoe import DTYPES

GGUF_TYPE_HELP = (
    "With --format gguf: bf16, f16, f32, q8_0 (the default), q4_0, q4_1, q5_0 or q5_1. For K-quants (Q4_K_M), "
    "write bf16 or f16 and run llama.cpp's llama-quantize on the file (docs/gguf.md)."
)
WEIGHT_CACHE_HELP = (
    "Memory fit's text generation may use to keep the base model's matrix slices between generated tokens "
    "(bfloat16 where the CPU multiplies it, else float32), e.g. 6GB: each is then read once instead of once "
    "per token. Default 0: stream them (bounded memory). The output is the same either way."
)
OFFLINE_HELP = (
    "Never contact the Hugging Face Hub: repo ids are read from the local cache only (as HF_HUB_OFFLINE=1 does). "
    "Without it, a repo id not in the cache is checked remotely, then only the files the merge reads are downloaded."
)
STREAM_SOURCES_HELP = (
    "Read Hub sources' tensors over HTTP range requests straight into the output instead of downloading them: "
    "disk for the output only (the base is still downloaded when the routers run prompts through it)."
)
BUILD_HASH_SOURCES_HELP = (
    "Compare sources by their full sha256 and re-hash every output file against its manifest (reads all of "
    "them once more). Without it, sources are compared by size and a sampled fingerprint (header and 16 "
    "blocks of 64 KiB), which misses a file rewritten in place with the same header and size, and outputs "
    "by file sizes only. An output whose record has only sampled fingerprints is rebuilt once to record full ones."
)

# What a merge writes: merge and build take all of these.
Seed = Annotated[int, typer.Option(help="Seed for random gates and expert noise.")]
ShardSize = Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB, 2GiB.")]
Dtype = Annotated[
    str | None, typer.Option(help=f"Output dtype ({', '.join(DTYPES)}); overrides the config.", show_default=False)
]
Layout = Annotated[
    str | None,
    typer.Option(
        help="Output tensor layout: classic (every loader; the default) or fused (Mixtral for transformers 5 only).",
        show_default=False,
    ),
]
MergeDevice = Annotated[str, typer.Option(help="Where the hidden-state pass runs: cpu or cuda.")]
NoCheck = Annotated[
    bool,
    typer.Option(
        "--no-check", help="Skip the routing check (the experts' positive prompts routed through the result)."
    ),
]
HashSources = Annotated[
    bool,
    typer.Option(
        "--hash-sources", help="Record every source weight file's full sha256 in the manifest (reads them again)."
    ),
]
# build's --hash-sources also decides how it compares sources and outputs, so its help says so.
BuildHashSources = Annotated[bool, typer.Option("--hash-sources", help=BUILD_HASH_SOURCES_HELP, show_default=False)]
OutputFormat = Annotated[
    str,
    typer.Option("--format", help="Output format: safetensors (a checkpoint folder) or gguf (one GGUF file)."),
]
GgufType = Annotated[str | None, typer.Option("--gguf-type", help=GGUF_TYPE_HELP, show_default=False)]

# How a merge runs, not what it writes.
WeightCache = Annotated[str, typer.Option("--weight-cache", help=WEIGHT_CACHE_HELP)]
Offline = Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)]
StreamSources = Annotated[bool, typer.Option("--stream-sources", help=STREAM_SOURCES_HELP)]

# Every command's.
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
ModelDevice = Annotated[str, typer.Option(help="Where the model runs: cpu or cuda.")]
Checkpoint = Annotated[Path, typer.Argument(help="A MoE checkpoint folder a merge wrote.", show_default=False)]
