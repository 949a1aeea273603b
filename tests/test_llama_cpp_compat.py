"""What llama.cpp needs of the safetensors outputs, checked without llama.cpp (the slow lane runs it).

- llama.cpp's qwen2moe requires an explicit output matrix (`output.weight`), so a Qwen2-MoE output of a
  tied base carries lm_head.weight (a copy of the embeddings) and says `tie_word_embeddings: false`;
  transformers computes exactly what it computed with the tied head. Other outputs keep the tie.
- llama.cpp's qwen2moe never renormalises the chosen experts' weights, while frankenmoe's Qwen2-MoE
  outputs do (`norm_topk_prob: true`): the merge warns, naming the fix, whenever that changes what the
  model computes (fewer experts per token than experts), and says nothing otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from frankenmoe.architectures.tables import OUTPUT_ARCHITECTURES
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.support import run_cli

SHAPE = ToyShape(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
MISMATCH = "never renormalises the weights of the 2 experts a qwen2_moe model picks per token out of 3"


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_model(
        tmp_path_factory.mktemp("tied") / "llama", shape=SHAPE, model_type="llama", tie_word_embeddings=True
    )


def merge(tmp_path: Path, base: Path, architecture: str, experts: int = 3, used: int = 2) -> Path:
    config = tmp_path / "config.yaml"
    data = {
        "base_model": str(base),
        "architecture": architecture,
        "gate_mode": "random",
        "experts_per_token": used,
        "experts": [{"source_model": str(base)} for _ in range(experts)],
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    result = run_cli("merge", config, out)
    assert result.exit_code == 0, result.output
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def test_qwen2_moe_of_a_tied_base_writes_the_head_llama_cpp_needs_and_computes_the_same(
    tmp_path: Path, tied_llama: Path
) -> None:
    out = merge(tmp_path, tied_llama, "qwen2_moe", experts=2, used=2)

    written = tensors(out)
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert run_cli("verify", out).exit_code == 0
    ids = torch.tensor([[1, 415, 2936, 349, 264, 1369]])
    with torch.no_grad():
        moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(tied_llama, dtype=torch.float32).eval()(ids).logits
    # Both experts are the base, every expert is chosen and the shared expert is silent: the dense model.
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)


def test_mixtral_of_a_tied_base_keeps_the_tie(tmp_path: Path, tied_llama: Path) -> None:
    out = merge(tmp_path, tied_llama, "mixtral")

    assert "lm_head.weight" not in tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_qwen2_moe_with_fewer_experts_per_token_than_experts_warns_that_llama_cpp_differs(
    tmp_path: Path, tied_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="frankenmoe"):
        merge(tmp_path, tied_llama, "qwen2_moe", experts=3, used=2)

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(MISMATCH in message and "experts_per_token: 3" in message for message in warnings), warnings


@pytest.mark.parametrize(("architecture", "experts", "used"), [("qwen2_moe", 3, 3), ("mixtral", 3, 2)])
def test_no_llama_cpp_warning_where_llama_cpp_computes_the_same(
    tmp_path: Path, tied_llama: Path, caplog: pytest.LogCaptureFixture, architecture: str, experts: int, used: int
) -> None:
    with caplog.at_level(logging.WARNING, logger="frankenmoe"):
        merge(tmp_path, tied_llama, architecture, experts=experts, used=used)

    assert not [record for record in caplog.records if "llama.cpp" in record.getMessage()]


@pytest.mark.parametrize(
    ("architecture", "config", "mismatch"),
    [
        ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}, True),
        ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False}, False),
        ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 4, "norm_topk_prob": True}, False),
        ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}, False),
        ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False}, True),
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, False),
    ],
)
def test_llama_cpp_mismatch_is_read_from_any_config_json(architecture: str, config: dict, mismatch: bool) -> None:
    """`frankenmoe convert --to gguf` asks the same question of an existing checkpoint's config.json."""
    message = OUTPUT_ARCHITECTURES[architecture].llama_cpp_mismatch(config)
    assert (message is not None) == mismatch


def test_a_gguf_of_a_qwen2_moe_llama_cpp_would_compute_differently_is_refused_before_writing(
    tmp_path: Path, tied_llama: Path
) -> None:
    config = tmp_path / "config.yaml"
    data = {
        "base_model": str(tied_llama),
        "architecture": "qwen2_moe",
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": str(tied_llama)} for _ in range(3)],
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    for command in (
        ["merge", config, tmp_path / "out", "--format", "gguf"],
        ["merge", config, tmp_path / "out", "--format", "gguf", "--dry-run"],
    ):
        result = run_cli(*command)
        assert result.exit_code == 2, result.output
        assert MISMATCH in result.output and "experts_per_token: 3" in result.output
        assert not (tmp_path / "out").exists()
