"""Check that a merge's output does not depend on the shard size or on the number of CPU threads.

    python benchmarks/check_output_identity.py                     # small shape, random and hidden gates
    python benchmarks/check_output_identity.py --shape large --mode hidden

Shardings differ in their files, so across shard sizes every tensor's bytes are hashed by name; across
thread counts (OMP_NUM_THREADS, which sets torch's thread count) the sharding is the same and every
output file must be byte-identical. One expert gets noise and a residual scale, so the transformed
path (float32 arithmetic, then a cast) is checked as well as the byte copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from synthetic_models import CACHE, model_set

from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.io.safetensors import read_header

SHARD_SIZES = ("5GB", "300MB", "70MB")
THREAD_COUNTS = (1, 2, 4)
PROMPTS = (("write a python function", "fix my code"), ("tell me a story", "a poem about the sea"))


def write_config(path: Path, base: Path, experts: tuple[Path, ...], gate_mode: str) -> Path:
    lines = [f"base_model: {json.dumps(str(base))}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts:"]
    for index, expert in enumerate(experts):
        lines += [
            f"  - source_model: {json.dumps(str(expert))}",
            f"    positive_prompts: {json.dumps(list(PROMPTS[index % len(PROMPTS)]))}",
        ]
        if index == 1:
            lines += ["    noise_scale: 0.01", "    residual_scale: 0.5"]
    path.write_text("\n".join(lines) + "\n")
    return path


def merge(config: Path, out: Path, shard_size: str, threads: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(
        [sys.executable, "-m", "frankenmoe", "merge", str(config), str(out), "--shard-size", shard_size, "--no-check"],
        check=True,
        env=environment,
        stdout=subprocess.DEVNULL,
    )


def tensor_digests(folder: Path) -> dict[str, str]:
    digests = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as handle:
            for name, location in read_header(shard).items():
                handle.seek(location.start)
                digests[name] = hashlib.sha256(handle.read(location.nbytes)).hexdigest()
    return digests


def file_digests(folder: Path) -> dict[str, str]:
    # The build record holds the run's timings and peak RSS, so it differs from run to run by design.
    return {
        file.name: hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(folder.iterdir())
        if file.name != MANIFEST_NAME
    }


def check_mode(gate_mode: str, shape: str, experts: int, work: Path) -> bool:
    models = model_set(shape, experts)
    config = write_config(work / f"{gate_mode}.yaml", models.base, models.experts, gate_mode)
    out = work / "out"
    reference_tensors: dict[str, str] | None = None
    identical = True
    for shard_size in SHARD_SIZES:
        merge(config, out, shard_size, THREAD_COUNTS[-1])
        tensors = tensor_digests(out)
        shard_count = len(list(out.glob("*.safetensors")))
        same = reference_tensors is None or tensors == reference_tensors
        reference_tensors = reference_tensors or tensors
        identical &= same
        print(
            f"{gate_mode}: --shard-size {shard_size} ({shard_count} shards): tensors {'identical' if same else 'DIFFER'}"
        )
    reference_files: dict[str, str] | None = None
    for threads in THREAD_COUNTS:
        merge(config, out, SHARD_SIZES[0], threads)
        files = file_digests(out)
        same = reference_files is None or files == reference_files
        reference_files = reference_files or files
        identical &= same
        print(f"{gate_mode}: {threads} thread(s): every file {'identical' if same else 'DIFFERS'}")
    shutil.rmtree(out)
    return identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=("tiny", "small", "large"))
    parser.add_argument("--mode", action="append", dest="modes", choices=("random", "cheap_embed", "hidden", "fit"))
    parser.add_argument("--experts", type=int, default=4)
    args = parser.parse_args()
    work = CACHE / "identity"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = [check_mode(mode, args.shape, args.experts, work) for mode in args.modes or ["random", "hidden"]]
    shutil.rmtree(work)
    if not all(results):
        raise SystemExit("FAIL: the output depends on the shard size or the thread count")
    print("PASS: byte-identical output for every shard size and thread count")


if __name__ == "__main__":
    main()
