"""What applying LoRA adapters costs a merge: 7B-shaped layers, two experts, rank 16 and 64 against none.

    python benchmarks/lora_cost.py                       # 2 layers, ranks 16 and 64, 3 runs each
    python benchmarks/lora_cost.py --out-dir /dev/shm    # outputs on tmpfs: the merge's own cost, no disk
    python benchmarks/lora_cost.py --layers 1 --repeats 5

A random-weight bfloat16 base with Mistral-7B's layer shape (hidden 4096, intermediate 14336, 32 heads,
8 key-value heads) and `--layers` layers, and two float32 adapters per rank on its gate/up/down
projections in every layer, are written once to .cache/lora/ (by a child process). Then `frankenmoe
merge --no-check` runs as its own process, random gates, for each row:

- none: two experts that are the base itself, so every expert tensor is a byte copy;
- rank R: the experts are base+adapter1 and base+adapter2, so every expert matrix is computed as
  W + scale * (B @ A) in float32 and cast back to bfloat16.

A second table times the writer's step alone for one 7B `gate_proj` (14336 x 4096, bfloat16), in a
child process per row: `write.produce_piece` with no adapter but a residual-scale-style multiplier
(the float32 path every computed piece takes), and with a rank-R delta. It is the cost per adapted
matrix, without the start-up and disk time that dominate the merge rows.

Each merge row reports the median wall time, CPU time (user + system) and peak RSS (ru_maxrss from wait4)
over `--repeats` runs, with a warm page cache. The output (2.1 GB for 2 layers) is written and fsynced
into `--out-dir`; on a disk whose speed varies from run to run, tmpfs shows what the adapters
themselves cost. This process imports neither torch nor frankenmoe: a child's ru_maxrss starts from
its parent's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache" / "lora"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 4096, 14336, 32, 8
MLP = ("gate_proj", "up_proj", "down_proj")


def prepare(layers: int, ranks: list[int]) -> None:
    """Write the base model and two adapters per rank into CACHE (child process: imports torch)."""
    import torch
    from safetensors.torch import save_file

    from frankenmoe.testing.toymodels import ToyShape, write_toy_model

    base = CACHE / f"base-l{layers}"
    if not (base / "model.safetensors").is_file():
        write_toy_model(
            base, shape=ToyShape(HIDDEN, layers, INTERMEDIATE, HEADS, KV_HEADS, 32000, 4096), dtype="bfloat16"
        )
    for rank in ranks:
        for copy in (1, 2):
            folder = CACHE / f"adapter-l{layers}-r{rank}-{copy}"
            if (folder / "adapter_model.safetensors").is_file():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(rank * 10 + copy)
            tensors = {}
            for layer in range(layers):
                for part in MLP:
                    rows, columns = (HIDDEN, INTERMEDIATE) if part == "down_proj" else (INTERMEDIATE, HIDDEN)
                    prefix = f"base_model.model.model.layers.{layer}.mlp.{part}"
                    tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, columns, generator=generator) * 0.01
                    tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * 0.01
            save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MLP)}
            (folder / "adapter_config.json").write_text(json.dumps(config))


def time_matrix(layers: int, rank: int, repeats: int) -> None:
    """Child process: median seconds of produce_piece for layer 0's gate_proj (rank 0: no adapter), as JSON."""
    import resource

    import torch

    from frankenmoe.merging.plan import TensorJob, TensorPiece
    from frankenmoe.merging.writer import produce_piece
    from frankenmoe.sources.adapter import load_adapter
    from frankenmoe.sources.model import load_source

    base = load_source(str(CACHE / f"base-l{layers}"))
    name = base.family.mlp_name(0, "gate_proj")
    location = base.tensor(name)
    if rank:
        delta = load_adapter(str(CACHE / f"adapter-l{layers}-r{rank}-1"), base, "benchmark").delta(name)
        piece = TensorPiece(location, lora=delta)
    else:
        piece = TensorPiece(location, multiplier=0.5)
    job = TensorJob(name, location.dtype, location.shape, 0, (piece,))
    produce_piece(piece, job, torch.device("cpu"))  # warm the page cache
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        produce_piece(piece, job, torch.device("cpu"))
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": statistics.median(seconds), "peak": peak}))


def measure(argv: list[str], log: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS bytes of one run of argv; fails loudly on a non-zero exit."""
    start = time.perf_counter()
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed; see {log}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def write_config(path: Path, base: Path, experts: list[str]) -> Path:
    lines = [f"base_model: {json.dumps(str(base))}", "gate_mode: random", "experts:"]
    lines += [f"  - source_model: {json.dumps(expert)}" for expert in experts]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=CACHE / "runs", help="where each merge writes its output")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time-matrix", type=int, metavar="RANK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.layers, args.ranks)
        return
    if args.time_matrix is not None:
        time_matrix(args.layers, args.time_matrix, max(args.repeats, 5))
        return
    subprocess.run(
        [sys.executable, __file__, "--prepare", "--layers", str(args.layers), "--ranks", *map(str, args.ranks)],
        check=True,
    )
    base = CACHE / f"base-l{args.layers}"
    rows = {"none": [str(base), str(base)]}
    for rank in args.ranks:
        rows[f"rank {rank}"] = [f"{base}+{CACHE / f'adapter-l{args.layers}-r{rank}-{copy}'}" for copy in (1, 2)]
    runs = CACHE / "runs"
    runs.mkdir(exist_ok=True)
    out = args.out_dir / "lora-cost-out"
    frankenmoe = [sys.executable, "-m", "frankenmoe"]
    print(f"{args.layers} layers, 2 experts, output in {args.out_dir}, median of {args.repeats} run(s)")
    print("| adapter | wall (s) | CPU (s) | peak RSS (MB) |\n|---|---:|---:|---:|")
    for label, experts in rows.items():
        config = write_config(runs / "config.yaml", base, experts)
        measurements = []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            measurements.append(
                measure([*frankenmoe, "merge", str(config), str(out), "--no-check"], runs / "merge.log")
            )
            shutil.rmtree(out, ignore_errors=True)
        wall, cpu, peak = (statistics.median(run[field] for run in measurements) for field in range(3))
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {peak / 1e6:.0f} |", flush=True)
    print("\none 7B gate_proj (14336 x 4096, bfloat16) through write.produce_piece, median of 5 or more")
    print("| piece | seconds | peak RSS of the process (MB) |\n|---|---:|---:|")
    for rank in (0, *args.ranks):
        command = [sys.executable, __file__, "--time-matrix", str(rank), "--layers", str(args.layers)]
        result = json.loads(
            subprocess.run(
                [*command, "--repeats", str(args.repeats)], check=True, capture_output=True, text=True
            ).stdout
        )
        label = f"rank {rank} adapter" if rank else "no adapter, multiplier (float32 path)"
        print(f"| {label} | {result['seconds']:.2f} | {result['peak'] / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
