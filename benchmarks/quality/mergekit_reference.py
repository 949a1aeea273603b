"""The reference tool: mergekit-moe (PyPI `mergekit` 0.1.5) on the benchmark's full fine-tunes.

    .venv/bin/python -m benchmarks.quality.mergekit_reference [--setup-only]

mergekit is never a frankenmoe dependency: it lives in its own virtual environment,
benchmarks/.cache/mergekit-venv/, created here on first use (torch 2.13.0 CPU first, then
mergekit==0.1.5 and what it pulls in). The merge is base + code + maths full fine-tunes, keyword
prompts (run.PROMPTS), top-2, gate_mode hidden (mergekit's default), run on the CPU, offline, on the
local folders; it lands in benchmarks/.cache/quality/merges/mergekit-moe/ and is evaluated by
`full_finetunes` like every other merge. Each step's command line and output are logged in
benchmarks/.cache/quality/mergekit.log, and a failure is recorded there verbatim.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.quality.domains import CACHE, ROOT

VENV = ROOT / "benchmarks" / ".cache" / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
LOG = CACHE / "mergekit.log"
OUT = CACHE / "merges" / "mergekit-moe"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, appending it and its whole output to the log; raises on failure."""
    LOG.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    with LOG.open("a") as log:
        log.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        log.write(f"[exit {result.returncode} after {time.perf_counter() - started:.0f} s]\n\n")
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{tail}")
    return result


def ensure_venv() -> Path:
    """The venv with mergekit-moe, created (and torch, then mergekit, installed) when missing."""
    marker = VENV / "installed.txt"
    wanted = f"torch=={TORCH_VERSION} mergekit=={MERGEKIT_VERSION}\n"
    if marker.is_file() and marker.read_text() == wanted:
        return VENV / "bin" / "mergekit-moe"
    _run([sys.executable, "-m", "venv", "--clear", str(VENV)])
    pip = [str(venv_python()), "-m", "pip", "install", "--no-input"]
    _run([*pip, f"torch=={TORCH_VERSION}"])
    _run([*pip, f"mergekit=={MERGEKIT_VERSION}"])
    _run([str(venv_python()), "-m", "pip", "freeze"])
    marker.write_text(wanted)
    return VENV / "bin" / "mergekit-moe"


def mergekit_config(base: Path, experts: dict[str, Path], prompts: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """mergekit-moe's YAML: the base as the general expert beside the code and maths experts, top-2."""
    sources = {"general": base, **experts}
    return {
        "base_model": str(base),
        "gate_mode": "hidden",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(folder), "positive_prompts": list(prompts[domain])}
            for domain, folder in sources.items()
        ],
    }


def merge(config: dict[str, Any], out: Path = OUT) -> float:
    """Run mergekit-moe on `config` into `out`; returns the seconds it took."""
    executable = ensure_venv()
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = out.parent / "mergekit-moe.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    _run([str(executable), str(config_file), str(out), "--device", "cpu", "--copy-tokenizer", "--allow-crimes"], env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup-only", action="store_true", help="Only create the venv.")
    parser.add_argument("--eval-blocks", type=int, default=16, help="As for full_finetunes.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(ensure_venv())
    if not args.setup_only:
        import torch

        from benchmarks.quality.full_finetunes import run_mergekit

        torch.set_num_threads(args.threads)
        run_mergekit(args.eval_blocks)


if __name__ == "__main__":
    main()
