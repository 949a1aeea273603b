"""A merge streams tensors: its peak memory must not grow with the size of the models it merges.

Each merge runs in a fresh Python process that reports its own peak RSS (VmHWM) on exit. VmHWM
belongs to the process's address space, so unlike ru_maxrss it does not inherit the peak of this
pytest process, which has torch and the test fixtures loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.support import write_config

# Layers are mostly MLP, so doubling the layer count nearly doubles every model and the output.
LAYER_SHAPE = {"hidden_size": 256, "intermediate_size": 8192, "num_attention_heads": 4, "num_key_value_heads": 2}
SMALLER_LAYERS, LARGER_LAYERS = 2, 6

MERGE_REPORTING_PEAK_RSS = """
import sys
from pathlib import Path
from frankenmoe.cli import app
try:
    app(sys.argv[2:], prog_name="frankenmoe")
except SystemExit as exit:
    if exit.code:
        raise
status = Path("/proc/self/status").read_text()
peak_kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
Path(sys.argv[1]).write_text(peak_kb)
"""


def merge_peak_rss(config: Path, out: Path, report: Path) -> int:
    """Merge in a fresh process; its peak resident memory in bytes."""
    result = subprocess.run(
        [sys.executable, "-c", MERGE_REPORTING_PEAK_RSS, str(report), "merge", str(config), str(out), "--no-check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return int(report.read_text()) * 1024


def model_set(folder: Path, layers: int) -> tuple[Path, tuple[Path, ...]]:
    shape = ToyShape(num_hidden_layers=layers, vocab_size=32000, **LAYER_SHAPE)
    base = write_toy_model(folder / "base", shape=shape, dtype="bfloat16")
    experts = tuple(
        write_toy_model(folder / f"expert{seed}", shape=shape, dtype="bfloat16", mlp_seed=seed) for seed in (1, 2, 3)
    )
    return base, experts


def output_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


# fit continues every prompt by 32 tokens first: text generation that streams the model once per token.
@pytest.mark.slow  # merges of models made three times larger, or a 500 MB pickle: seconds each
@pytest.mark.parametrize("gate_mode", ["hidden", "fit"])
def test_peak_memory_of_a_prompt_based_merge_barely_grows_when_the_models_triple(
    tmp_path: Path, gate_mode: str
) -> None:
    peaks, sizes = [], []
    for layers in (SMALLER_LAYERS, LARGER_LAYERS):
        base, experts = model_set(tmp_path / f"models{layers}", layers)
        config = write_config(tmp_path / f"moe{layers}.yaml", base, experts, gate_mode=gate_mode, dtype="bfloat16")
        out = tmp_path / f"out{layers}"
        peaks.append(merge_peak_rss(config, out, tmp_path / f"peak{layers}"))
        sizes.append(output_bytes(out))

    size_growth = sizes[1] - sizes[0]
    assert size_growth > 100e6, "the larger merge must write clearly more for the comparison to mean anything"
    # One layer of float32 weights in the hidden pass is ~27 MB here and the outputs differ by ~150 MB: a merge
    # that held a shard, or one expert's weights, in memory would grow by about that much.
    assert peaks[1] - peaks[0] < 0.2 * size_growth, (
        f"peak RSS went from {peaks[0] / 1e6:.0f} MB to {peaks[1] / 1e6:.0f} MB "
        f"while the output grew by {size_growth / 1e6:.0f} MB"
    )
