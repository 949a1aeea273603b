"""Speed and peak memory of `frankenmoe eval` on the merge benchmark's large shape (1.1B-parameter models).

    .venv/bin/python -m benchmarks.eval_speed --windows 2

Makes the large synthetic set (a base and two MLP "fine-tunes", bfloat16, cached in
benchmarks/.cache/eval/) and a 2-expert top-2 Mixtral of them, then runs `frankenmoe eval` on about
`--windows` windows of 256 tokens of this repository's README as its own process, recording its
wall time and peak RSS (ru_maxrss from wait4). Four models are scored: the MoE, the base and the two
experts. Like run_merge_bench, this process imports neither torch nor frankenmoe, so the child's
ru_maxrss is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "eval"
CHARACTERS_PER_TOKEN = 3
"""Markdown with code runs at 3-4 characters per token with the Mistral tokenizer: a little more text
than the windows need, so they are full; the tail is dropped."""


def run(*args: str) -> str:
    return subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=ROOT).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    code = "from benchmarks.synthetic_models import model_set; import json, sys; m = model_set('large', 2, "
    code += f"cache=__import__('pathlib').Path({str(CACHE)!r})); print(json.dumps([str(f) for f in m.folders]))"
    base, *experts = json.loads(run("-c", code))
    moe = CACHE / "moe"
    if not (moe / "frankenmoe-manifest.json").is_file():
        config = CACHE / "moe.json"  # JSON is YAML
        entries = [{"source_model": expert} for expert in experts]
        config.write_text(json.dumps({"base_model": base, "gate_mode": "random", "experts": entries}))
        run("-m", "frankenmoe", "merge", str(config), str(moe), "--no-check", "--force")
    text = CACHE / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[: args.windows * 256 * CHARACTERS_PER_TOKEN])
    command = [sys.executable, "-m", "frankenmoe", "eval", str(moe), "--text", f"readme={text}", "--json"]
    command += ["--device", args.device]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"eval failed with status {status}")
    report = json.loads(output)
    tokens = report["domains"][0]["tokens"]
    models = len(report["models"])
    print(
        f"{models} models x {tokens} tokens in {seconds:.1f} s: {models * tokens / seconds:.1f} tokens/s "
        f"(all models together), peak RSS {usage.ru_maxrss / 1e6:.2f} GB"
    )
    print(json.dumps(report["domains"], indent=1))


if __name__ == "__main__":
    main()
