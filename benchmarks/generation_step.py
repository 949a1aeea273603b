"""Time of one greedy generation step (router.continuation_tokens) on layers of a given shape.

    python benchmarks/generation_step.py                  # Mistral-7B-shaped layers, 2 and 4 of them
    python benchmarks/generation_step.py --threads 2      # matrix slices spread over 2 worker threads
    python benchmarks/generation_step.py --threads 2 --weight-cache 12GB   # slices kept between steps
    python benchmarks/generation_step.py --threads 2 --products float32    # before issue 28: float32 products

Writes random-weight bfloat16 models with 2 and 4 layers of the shape (cached in .cache/generation/),
then times `greedy_continuations` for 8 prompts as the merge's router thread runs it (one intra-op
thread; matrix slices on `--threads` slice workers, default 1), with the CLI's buffer policy. The
difference between the two models is the cost of one layer per generated token; the intercept is
the embeddings and the head. A full model's step is about layers x per-layer + intercept, if the
model stays in the page cache. Besides wall time it prints the process's CPU time per step, which
other processes on the machine disturb less.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.decoder.generate import greedy_continuations
from frankenmoe.decoder.slices import SliceCache, cpu_multiplies_bfloat16
from frankenmoe.merging.plan import parse_size
from frankenmoe.runtime.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.sources.model import load_source
from frankenmoe.testing.toymodels import ToyShape, write_toy_model

CACHE = Path(__file__).resolve().parent / ".cache" / "generation"
PROMPTS = [torch.tensor([1, 100 + index, 200 + index, 300, 400, 500]) for index in range(8)]


def seconds_per_step(folder: Path, steps: int, cache_bytes: int, bfloat16: bool) -> tuple[float, float]:
    """Wall and CPU seconds per generated token (CPU: this process's user + system time, all threads)."""
    source = load_source(str(folder))
    cache = SliceCache(cache_bytes, native_bfloat16=bfloat16)
    decoder = StreamedDecoder(source.config, source.tensors, slice_cache=cache)
    greedy_continuations(decoder, PROMPTS, 1, set())  # warm the page cache
    cpu_started, started = _cpu_seconds(), time.perf_counter()
    greedy_continuations(decoder, PROMPTS, steps, set())
    return (time.perf_counter() - started) / steps, (_cpu_seconds() - cpu_started) / steps


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--model-layers", type=int, default=32, help="layers of the full model to extrapolate to")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="slice worker threads (sets OMP_NUM_THREADS)")
    parser.add_argument("--weight-cache", default="0", help="slices kept between steps (decoder.slices.SliceCache)")
    parser.add_argument(
        "--products",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="how matrices are multiplied; auto: as a merge does (bfloat16 where the CPU has bfloat16 units)",
    )
    args = parser.parse_args()
    bfloat16 = args.products == "bfloat16" or (args.products == "auto" and cpu_multiplies_bfloat16())
    print(f"products: {'bfloat16' if bfloat16 else 'float32'}", flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by frankenmoe.decoder.slices.slice_workers
    keep_large_buffers_out_of_the_heap()
    torch.set_num_threads(1)
    timings, cpu = {}, {}
    for layers in (2, 4):
        shape = ToyShape(args.hidden, layers, args.intermediate, args.hidden // 128, 8, 32000, 4096)
        folder = CACHE / f"h{args.hidden}-i{args.intermediate}-l{layers}"
        if not (folder / "model.safetensors").is_file():
            write_toy_model(folder, shape=shape, dtype="bfloat16")
        timings[layers], cpu[layers] = seconds_per_step(
            folder, args.steps, parse_size(args.weight_cache, "Weight cache", minimum=0), bfloat16
        )
        print(
            f"{layers} layers: {timings[layers]:.2f} s per generated token, {cpu[layers]:.2f} s CPU "
            f"(8 prompts, {args.threads} thread(s))",
            flush=True,
        )
    per_layer = (timings[4] - timings[2]) / 2
    intercept = timings[2] - 2 * per_layer
    full = args.model_layers * per_layer + intercept
    print(
        f"per layer {per_layer:.3f} s ({(cpu[4] - cpu[2]) / 2:.3f} s CPU), embeddings and head {intercept:.2f} s; "
        f"a {args.model_layers}-layer model: {full:.1f} s per token, {32 * full / 60:.1f} min for 32 tokens"
    )


if __name__ == "__main__":
    main()
