"""Time of one greedy generation step (router.continuation_tokens) on layers of a given shape.

    python benchmarks/generation_step.py                  # Mistral-7B-shaped layers, 2 and 4 of them

Writes random-weight bfloat16 models with 2 and 4 layers of the shape (cached in .cache/generation/),
then times `greedy_continuations` for 8 prompts at one thread, as the merge's router thread runs it,
with the CLI's buffer policy. The difference between the two models is the cost of one layer per
generated token; the intercept is the embeddings and the head. A full model's step is about
layers x per-layer + intercept, if the model stays in the page cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from frankenmoe.layers import StreamedDecoder, greedy_continuations
from frankenmoe.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.sources import load_source
from frankenmoe.toymodels import ToyShape, write_toy_model

CACHE = Path(__file__).resolve().parent / ".cache" / "generation"
PROMPTS = [torch.tensor([1, 100 + index, 200 + index, 300, 400, 500]) for index in range(8)]


def seconds_per_step(folder: Path, steps: int) -> float:
    source = load_source(str(folder))
    decoder = StreamedDecoder(source.config, source.tensors)
    greedy_continuations(decoder, PROMPTS, 1, set())  # warm the page cache
    started = time.perf_counter()
    greedy_continuations(decoder, PROMPTS, steps, set())
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--model-layers", type=int, default=32, help="layers of the full model to extrapolate to")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    keep_large_buffers_out_of_the_heap()
    torch.set_num_threads(1)
    timings = {}
    for layers in (2, 4):
        shape = ToyShape(args.hidden, layers, args.intermediate, args.hidden // 128, 8, 32000, 4096)
        folder = CACHE / f"h{args.hidden}-i{args.intermediate}-l{layers}"
        if not (folder / "model.safetensors").is_file():
            write_toy_model(folder, shape=shape, dtype="bfloat16")
        timings[layers] = seconds_per_step(folder, args.steps)
        print(f"{layers} layers: {timings[layers]:.2f} s per generated token (8 prompts, 1 thread)", flush=True)
    per_layer = (timings[4] - timings[2]) / 2
    intercept = timings[2] - 2 * per_layer
    full = args.model_layers * per_layer + intercept
    print(
        f"per layer {per_layer:.2f} s, embeddings and head {intercept:.2f} s; a {args.model_layers}-layer model: "
        f"{full:.1f} s per token, {32 * full / 60:.1f} min for 32 tokens"
    )


if __name__ == "__main__":
    main()
