"""Does the order a merge reads its sources in matter from a cold page cache?

    sudo python benchmarks/cold_copy_order.py                 # large shape, 3 expert files, 2 repeats
    sudo python benchmarks/cold_copy_order.py --repeats 3 --files 4

Copies the weight files of the benchmark's synthetic experts (benchmarks/.cache/<shape>/expertN,
made by synthetic_models.py) into one output file with the merge writer's own `copy_range`
(`copy_file_range`), each way after emptying the whole page cache (root: run_merge_bench's
`drop_page_cache`), then fsyncs it. The ways:

- `cp`: coreutils cp of each file, then sync (the floor run_merge_bench.py uses);
- `per-file`: one copy_file_range loop per whole file;
- `per-tensor, file order`: one copy per tensor, every tensor of a file before the next file;
- `per-tensor, round-robin`: one copy per tensor, taking a tensor from each file in turn, as the
  merge does when it writes a layer's experts one after another;
- `per-tensor, file order, sequential hint`: as file order, with POSIX_FADV_SEQUENTIAL on each source,
  which cp sets.

It prints wall time and system CPU time per way and repeat (cp's include its child processes).
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from run_merge_bench import drop_page_cache

from frankenmoe.io.safetensors import read_header
from frankenmoe.io.shards import copy_range

CACHE = Path(__file__).resolve().parent / ".cache"
Range = tuple[Path, int, int]
"""A source file, the offset of a tensor's first byte in it, and the tensor's size."""


def tensor_ranges(file: Path) -> list[Range]:
    locations = sorted(read_header(file).values(), key=lambda location: location.start)
    return [(file, location.start, location.nbytes) for location in locations]


def copy_ranges(ranges: list[Range], target: Path, sequential_hint: bool = False) -> None:
    descriptors = {file: os.open(file, os.O_RDONLY) for file in {file for file, _, _ in ranges}}
    output = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if sequential_hint:
            for descriptor in descriptors.values():
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for file, offset, count in ranges:
            copy_range(descriptors[file], output, offset, count)
        os.fsync(output)
    finally:
        os.close(output)
        for descriptor in descriptors.values():
            os.close(descriptor)


def copy_with_cp(files: list[Path], target: Path) -> None:
    copies = [target.with_name(f"{target.name}.{index}") for index in range(len(files))]
    try:
        for file, copy in zip(files, copies, strict=True):
            subprocess.run(["cp", str(file), str(copy)], check=True)
        subprocess.run(["sync", *map(str, copies)], check=True)
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)


def ways(files: list[Path], target: Path) -> dict[str, Callable[[], None]]:
    per_file = [tensor_ranges(file) for file in files]
    file_order = list(itertools.chain.from_iterable(per_file))
    round_robin = [item for group in itertools.zip_longest(*per_file) for item in group if item is not None]
    whole_files = [(file, 0, file.stat().st_size) for file in files]
    return {
        "cp": lambda: copy_with_cp(files, target),
        "per-file": lambda: copy_ranges(whole_files, target),
        "per-tensor, file order": lambda: copy_ranges(file_order, target),
        "per-tensor, round-robin": lambda: copy_ranges(round_robin, target),
        "per-tensor, file order, sequential hint": lambda: copy_ranges(file_order, target, sequential_hint=True),
    }


def system_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_stime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="large")
    parser.add_argument("--files", type=int, default=3, help="how many expert files to copy")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target", type=Path, default=CACHE / "cold-copy.out")
    args = parser.parse_args()
    files = [CACHE / args.shape / f"expert{index}" / "model.safetensors" for index in range(1, args.files + 1)]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: run python benchmarks/synthetic_models.py --shape {args.shape}"
        )
    if os.geteuid() != 0:
        raise SystemExit("emptying the page cache needs root (it writes /proc/sys/vm/drop_caches)")
    total = sum(file.stat().st_size for file in files)
    print(f"{len(files)} files, {total / 1e9:.2f} GB, page cache emptied before every copy")
    try:
        for repeat in range(args.repeats):
            for name, copy in ways(files, args.target).items():
                drop_page_cache()
                system, started = system_seconds(), time.perf_counter()
                copy()
                wall = time.perf_counter() - started
                print(f"run {repeat + 1}  {name:42} {wall:6.2f} s wall, {system_seconds() - system:6.2f} s system")
                args.target.unlink(missing_ok=True)
    finally:
        args.target.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
