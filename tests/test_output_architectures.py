"""Every output architecture against transformers' own classes: Qwen2-MoE (shared expert), Qwen3-MoE, and
the rope settings every output writes; plus the refusals that keep a source tensor from being lost.

Identity tests: a MoE whose routed experts are all the base model computes exactly the base's MLP at
every layer (the top-k weights are renormalised to 1), so its logits must equal the dense model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from frankenmoe.analysis.routing import route_prompts
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.routers.request import NEUTRAL_GATE
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.support import LLAMA3_ROPE, run_cli

SHAPE = ToyShape(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
SHARED_SHAPE = ToyShape(
    hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2
)
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps"
PROMPTS = (["write python code", "def f(x): return x"], ["once upon a time", "a dragon slept"], ["solve 2x = 4"])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}
    for family in ("qwen2", "qwen3", "llama"):
        made[family] = write_toy_model(root / family, shape=SHAPE, model_type=family, base_seed=3)
        for index in (1, 2):
            made[f"{family}-expert{index}"] = write_toy_model(
                root / f"{family}-expert{index}", shape=SHAPE, model_type=family, base_seed=3, mlp_seed=30 + index
            )
    made["qwen2-shared"] = write_toy_model(
        root / "qwen2-shared", shape=SHARED_SHAPE, model_type="qwen2", base_seed=3, mlp_seed=99
    )
    return made


def write_merge_config(
    path: Path, base: Path, experts: Sequence[Path], *, shared: Sequence[dict[str, Any]] = (), **top_level: Any
) -> Path:
    data: dict[str, Any] = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": min(2, len(experts)),
        "experts": [
            {"source_model": str(expert), "positive_prompts": PROMPTS[index % len(PROMPTS)]}
            for index, expert in enumerate(experts)
        ],
        **top_level,
    }
    if shared:
        data["shared_experts"] = list(shared)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def merged(tmp_path: Path, base: Path, experts: Sequence[Path], *options: str, **config: Any) -> Path:
    out = tmp_path / "out"
    result = run_cli("merge", write_merge_config(tmp_path / "config.yaml", base, experts, **config), out, *options)
    assert result.exit_code == 0, result.output
    return out


def load_exactly(folder: Path) -> torch.nn.Module:
    """The checkpoint in its transformers class, with no missing, unexpected or mismatched tensor."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def logits(model: torch.nn.Module, length: int = 12) -> torch.Tensor:
    ids = torch.arange(5, 5 + length).unsqueeze(0) * 37 % 31000
    with torch.no_grad():
        return model(ids).logits[0]


def assert_reproduces_dense(moe_folder: Path, dense_folder: Path, length: int = 12) -> None:
    moe, dense = load_exactly(moe_folder), load_exactly(dense_folder)
    torch.testing.assert_close(logits(moe, length), logits(dense, length), rtol=1e-5, atol=1e-5)
    generated = moe.generate(torch.tensor([[1, 415, 2936]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_auto_picks_qwen3_moe_for_qwen3_sources_and_it_reproduces_the_dense_model(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    out = merged(tmp_path, models["qwen3"], [models["qwen3"]] * 3)

    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["architectures"]) == (
        "qwen3_moe",
        3,
        ["Qwen3MoeForCausalLM"],
    )
    assert_reproduces_dense(out, models["qwen3"])


def test_qwen3_moe_copies_q_norm_and_k_norm_and_expert_mlps_bit_for_bit(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    experts = [models["qwen3-expert1"], models["qwen3-expert2"]]
    out = merged(tmp_path, models["qwen3"], experts)

    written = load_index(out)
    base = load_file(models["qwen3"] / "model.safetensors")
    for layer in range(SHAPE.num_hidden_layers):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{norm}.weight"
            assert torch.equal(written[name], base[name])
        for index, expert in enumerate(experts):
            source = load_file(expert / "model.safetensors")
            for part in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(
                    written[f"model.layers.{layer}.mlp.experts.{index}.{part}.weight"],
                    source[f"model.layers.{layer}.mlp.{part}.weight"],
                )


def test_qwen2_moe_with_copies_of_the_base_and_a_silent_shared_expert_reproduces_dense_qwen2(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    shared = [{"source_model": str(models["qwen2-shared"]), "residual_scale": 0.0}]
    out = merged(tmp_path, models["qwen2"], [models["qwen2"]] * 3, shared=shared)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe"
    assert (config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == (128, 96)
    assert (config["decoder_sparse_step"], config["mlp_only_layers"], config["norm_topk_prob"]) == (1, [], True)
    assert_reproduces_dense(out, models["qwen2"])


def test_llama_sources_into_qwen2_moe_get_exact_zero_biases_and_reproduce_dense_llama(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    out = merged(tmp_path, models["llama"], [models["llama"]] * 2, architecture="qwen2_moe")

    written = load_index(out)
    for layer in range(SHAPE.num_hidden_layers):
        for projection in ("q_proj", "k_proj", "v_proj"):
            bias = written[f"model.layers.{layer}.self_attn.{projection}.bias"]
            assert torch.count_nonzero(bias) == 0
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == 1
    assert torch.count_nonzero(written["model.layers.0.mlp.shared_expert.down_proj.weight"]) == 0
    assert_reproduces_dense(out, models["llama"])


def test_qwen2_moe_tensors_are_bit_identical_to_their_sources(tmp_path: Path, models: dict[str, Path]) -> None:
    experts = [models["qwen2-expert1"], models["qwen2-expert2"]]
    shared = [{"source_model": str(models["qwen2-shared"]), "positive_prompts": ["anything at all"]}]
    out = merged(tmp_path, models["qwen2"], experts, shared=shared, gate_mode="hidden")

    written = load_index(out)
    base = load_file(models["qwen2"] / "model.safetensors")
    shared_source = load_file(models["qwen2-shared"] / "model.safetensors")
    for layer in range(SHAPE.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for projection in ("q_proj", "k_proj", "v_proj"):
            name = f"{prefix}self_attn.{projection}.bias"
            assert torch.equal(written[name], base[name])
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                written[f"{prefix}mlp.shared_expert.{part}.weight"], shared_source[f"{prefix}mlp.{part}.weight"]
            )
            for index, expert in enumerate(experts):
                source = load_file(expert / "model.safetensors")
                assert torch.equal(
                    written[f"{prefix}mlp.experts.{index}.{part}.weight"], source[f"{prefix}mlp.{part}.weight"]
                )
        gate = written[f"{prefix}mlp.shared_expert_gate.weight"]
        assert gate.shape == (1, SHAPE.hidden_size) and torch.count_nonzero(gate) > 0
    card = (out / "README.md").read_text()
    assert "shared expert" in card and "from the shared expert's prompts" in card
    load_exactly(out)


def test_shared_expert_gate_is_neutral_without_prompts_and_the_dry_run_says_so(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    shared = [{"source_model": str(models["qwen2-shared"])}]
    config = write_merge_config(
        tmp_path / "config.yaml", models["qwen2"], [models["qwen2-expert1"]] * 2, shared=shared, gate_mode="hidden"
    )

    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "shared-expert gate: neutral (1e-06 everywhere: the shared expert has no positive_prompts" in dry.output
    assert "architecture: qwen2_moe (auto: the natural output for qwen2 sources)" in dry.output
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    gates = [
        tensor for name, tensor in load_index(tmp_path / "out").items() if name.endswith("shared_expert_gate.weight")
    ]
    # Not exact zeros: llama.cpp's sigmoid is silu(x) / x, which an exactly zero logit turns into 0 / 0.
    assert len(gates) == SHAPE.num_hidden_layers and all(torch.all(gate == NEUTRAL_GATE) for gate in gates)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_route_gives_the_router_probabilities_transformers_computes(
    tmp_path: Path, models: dict[str, Path], family: str
) -> None:
    shared = [{"source_model": str(models["qwen2-shared"]), "positive_prompts": ["x"]}] if family == "qwen2" else ()
    experts = [models[f"{family}-expert1"], models[f"{family}-expert2"], models[family]]
    out = merged(tmp_path, models[family], experts, shared=shared, gate_mode="hidden", experts_per_token=2)

    checkpoint = load_checkpoint(out)
    (routing,) = route_prompts(checkpoint, [TEXT])
    model = load_exactly(out)
    captured: list[torch.Tensor] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _i, output: captured.append(output[0].detach()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(routing.prompt.token_ids.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    expected = torch.stack([torch.softmax(logits.float(), dim=-1) for logits in captured])
    torch.testing.assert_close(routing.probabilities, expected, rtol=1e-4, atol=1e-5)

    report = run_cli("inspect", out, "--json")
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    assert (data["num_experts"], data["experts_per_token"], data["layout"]) == (3, 2, "classic")


def write_config_rope(folder: Path, rope: dict[str, Any]) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))


def test_llama3_rope_and_tied_embeddings_into_mixtral_reproduce_the_dense_model_past_the_original_context(
    tmp_path: Path,
) -> None:
    llama3 = LLAMA3_ROPE
    base = write_toy_model(
        tmp_path / "llama3",
        shape=SHAPE,
        model_type="llama",
        tie_word_embeddings=True,
        extra_config={"rope_parameters": llama3},
    )
    write_config_rope(base, llama3)
    out = merged(tmp_path, base, [base, base])

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {key: value for key, value in llama3.items() if key != "rope_theta"}
    assert_reproduces_dense(out, base, length=48)


@pytest.mark.parametrize(
    ("family", "architecture"), [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]
)
def test_every_output_writes_rope_settings_that_read_the_same_either_way(
    tmp_path: Path, models: dict[str, Path], family: str, architecture: str
) -> None:
    out = merged(tmp_path, models[family], [models[f"{family}-expert1"]] * 2, architecture=architecture)

    written = json.loads((out / "config.json").read_text())
    # transformers 4.x and vLLM read rope_theta / rope_scaling; transformers 5 reads rope_parameters.
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 10000.0
    assert written["rope_scaling"] is None and written["rope_parameters"]["rope_type"] == "default"
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == written["rope_theta"]


def refusal(tmp_path: Path, base: Path, experts: Sequence[Path], *options: str, **config: Any) -> str:
    result = run_cli(
        "merge", write_merge_config(tmp_path / "config.yaml", base, experts, **config), tmp_path / "out", *options
    )
    assert result.exit_code != 0, result.output
    assert not (tmp_path / "out").exists()
    return result.output


def test_qwen2_sources_into_mixtral_are_refused_because_their_biases_would_be_lost(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    output = refusal(tmp_path, models["qwen2"], [models["qwen2-expert1"]], architecture="mixtral")
    assert "config error" in output and "biases" in output and "architecture: qwen2_moe" in output


def test_qwen3_sources_into_qwen2_moe_are_refused_because_their_q_k_norms_would_be_lost(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    output = refusal(tmp_path, models["qwen3"], [models["qwen3-expert1"]], architecture="qwen2_moe")
    assert "q_norm/k_norm" in output and "architecture: qwen3_moe" in output


def test_llama_sources_into_qwen3_moe_are_refused_naming_the_missing_norms(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    output = refusal(tmp_path, models["llama"], [models["llama-expert1"]], architecture="qwen3_moe")
    assert "q_norm/k_norm" in output and "architecture: mixtral" in output


def test_two_shared_experts_are_refused_because_qwen2_moe_has_one_slot(tmp_path: Path, models: dict[str, Path]) -> None:
    shared = [{"source_model": str(models["qwen2-shared"])}] * 2
    output = refusal(tmp_path, models["qwen2"], [models["qwen2-expert1"]], shared=shared)
    assert "2 shared experts" in output and "keep one" in output


def test_a_shared_expert_into_mixtral_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    shared = [{"source_model": str(models["llama-expert2"])}]
    output = refusal(tmp_path, models["llama"], [models["llama-expert1"]], shared=shared, architecture="mixtral")
    assert "shared expert, which mixtral has no slot for" in output and "architecture: qwen2_moe" in output


def test_auto_chooses_qwen2_moe_for_llama_sources_with_a_shared_expert(tmp_path: Path, models: dict[str, Path]) -> None:
    shared = [{"source_model": str(models["llama-expert2"])}]
    config = write_merge_config(tmp_path / "config.yaml", models["llama"], [models["llama-expert1"]], shared=shared)

    result = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "architecture: qwen2_moe (auto: mixtral cannot hold these sources" in result.output


def test_fused_layout_is_refused_for_an_output_that_has_none(tmp_path: Path, models: dict[str, Path]) -> None:
    output = refusal(tmp_path, models["qwen3"], [models["qwen3-expert1"]], "--layout", "fused")
    assert "--layout fused is not a tensor layout of qwen3_moe" in output


def test_an_unknown_architecture_is_a_config_error_listing_the_choices(tmp_path: Path, models: dict[str, Path]) -> None:
    output = refusal(tmp_path, models["llama"], [models["llama-expert1"]], architecture="deepseek_v3")
    assert "config error" in output and "auto, mixtral, qwen2_moe, qwen3_moe" in output
    assert ConfigError.exit_code == 2


def with_extra_tensors(source: Path, target: Path, extra: dict[str, torch.Tensor]) -> Path:
    """A copy of a model whose safetensors file also holds `extra`."""
    target.mkdir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (target / item.name).write_bytes(item.read_bytes())
    save_file({**load_file(source / "model.safetensors"), **extra}, target / "model.safetensors", {"format": "pt"})
    return target


def test_rotary_inv_freq_buffers_are_skipped_and_documented_and_hidden_merges_work(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    inv_freq = {f"model.layers.{layer}.self_attn.rotary_emb.inv_freq": torch.ones(8) for layer in range(2)}
    base = with_extra_tensors(models["llama"], tmp_path / "llama2-era", inv_freq)
    config = write_merge_config(tmp_path / "config.yaml", base, [base, models["llama-expert1"]], gate_mode="hidden")

    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "skipped: 2 tensor(s) of the base model that every loader derives" in dry.output
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not any("inv_freq" in name for name in load_index(tmp_path / "out"))


@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_attention_biases_a_llama_config_does_not_declare_are_refused_before_any_work(
    tmp_path: Path, models: dict[str, Path], gate_mode: str
) -> None:
    biases = {f"model.layers.{layer}.self_attn.q_proj.bias": torch.zeros(64) for layer in range(2)}
    base = with_extra_tensors(models["llama"], tmp_path / "biased", biases)

    output = refusal(tmp_path, base, [models["llama-expert1"]], gate_mode=gate_mode)
    assert "model error" in output and "'model.layers.0.self_attn.q_proj.bias'" in output
    assert "attention_bias" in output


def test_q_norms_in_a_llama_checkpoint_are_refused_naming_them(tmp_path: Path, models: dict[str, Path]) -> None:
    norms = {f"model.layers.{layer}.self_attn.q_norm.weight": torch.ones(16) for layer in range(2)}
    base = with_extra_tensors(models["llama"], tmp_path / "normed", norms)

    output = refusal(tmp_path, base, [models["llama-expert1"]])
    assert "'model.layers.0.self_attn.q_norm.weight'" in output and "refuses rather than drop them" in output
    assert ModelError.exit_code == 3


def test_a_llama_with_declared_attention_biases_is_refused_because_no_output_holds_an_o_proj_bias(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    base = write_toy_model(
        tmp_path / "biased-llama", shape=SHAPE, model_type="llama", extra_config={"attention_bias": True}
    )

    output = refusal(tmp_path, base, [base, base])
    assert "No output architecture can hold these sources" in output and "self_attn.o_proj.bias" in output


def load_index(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
