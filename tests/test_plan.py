"""The merge plan: which tensors the output holds, where their bytes come from, shards, counts, config."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

from frankenmoe.config.parse import parse_config
from frankenmoe.config.schema import MergeConfig
from frankenmoe.errors import ConfigError, InternalError
from frankenmoe.merging import planning
from frankenmoe.merging.plan import DEFAULT_SHARD_BYTES, Computed, MergePlan, parse_size
from frankenmoe.merging.planning import build_plan
from frankenmoe.sources.model import load_source
from tests.conftest import TinyModels

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 128, 32000, 4, 2, 16


def merge_config(base: Path, experts: list[Path], extra: str = "") -> MergeConfig:
    expert_lines = "".join(f"  - source_model: {folder}\n    positive_prompts: [x]\n" for folder in experts)
    return parse_config(f"base_model: {base}\n{extra}experts:\n{expert_lines}")


def plan_for(
    base: Path,
    experts: list[Path],
    extra: str = "",
    *,
    layout_name: str = "classic",
    dtype_override: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergePlan:
    config = merge_config(base, experts, extra)
    sources = tuple(load_source(str(folder)) for folder in experts)
    return build_plan(
        config,
        load_source(str(base)),
        sources,
        layout_name=layout_name,
        dtype_override=dtype_override,
        shard_bytes=shard_bytes,
    )


@pytest.fixture(scope="module")
def three_expert_plan(tiny_models: TinyModels) -> MergePlan:
    return plan_for(tiny_models.base, list(tiny_models.experts))


def test_classic_layout_lists_every_tensor_in_checkpoint_order(three_expert_plan: MergePlan) -> None:
    names = [job.name for job in three_expert_plan.jobs]
    layer0 = [name.removeprefix("model.layers.0.") for name in names if name.startswith("model.layers.0.")]

    routers = [f"model.layers.{layer}.block_sparse_moe.gate.weight" for layer in range(LAYERS)]

    assert names[0] == "model.embed_tokens.weight"
    # Routers come last so the writer can copy everything else while they are computed.
    assert names[-LAYERS - 2 :] == ["model.norm.weight", "lm_head.weight", *routers]
    assert layer0 == [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        *(f"block_sparse_moe.experts.{expert}.{w}.weight" for w in ("w1", "w2", "w3") for expert in range(3)),
        "block_sparse_moe.gate.weight",
    ]
    assert len(names) == len(set(names)) == 2 + 1 + LAYERS * (6 + 1 + 3 * 3)


def test_expert_tensors_come_from_their_source_mlp_in_config_order(
    three_expert_plan: MergePlan, tiny_models: TinyModels
) -> None:
    jobs = {job.name: job for job in three_expert_plan.jobs}
    parts = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

    for expert, folder in enumerate(tiny_models.experts):
        for w, part in parts.items():
            job = jobs[f"model.layers.1.block_sparse_moe.experts.{expert}.{w}.weight"]
            (piece,) = job.pieces
            assert piece.location.file == folder.resolve() / "model.safetensors"
            assert piece.location.name == f"model.layers.1.mlp.{part}.weight"
            assert not piece.transformed
    router = jobs["model.layers.1.block_sparse_moe.gate.weight"]
    assert (router.pieces, router.computed, router.shape) == ((), Computed("router", 1), (3, HIDDEN))
    attention = jobs["model.layers.0.self_attn.q_proj.weight"].pieces[0].location
    assert attention.file == tiny_models.base.resolve() / "model.safetensors"


def test_fused_layout_stacks_experts_into_two_tensors_per_layer(tiny_models: TinyModels) -> None:
    plan = plan_for(tiny_models.base, list(tiny_models.experts), layout_name="fused")
    jobs = {job.name: job for job in plan.jobs}

    gate_up = jobs["model.layers.0.mlp.experts.gate_up_proj"]
    down = jobs["model.layers.0.mlp.experts.down_proj"]
    assert gate_up.shape == (3, 2 * INTERMEDIATE, HIDDEN)
    assert down.shape == (3, HIDDEN, INTERMEDIATE)
    assert [piece.location.name.split(".")[-2] for piece in gate_up.pieces] == ["gate_proj", "up_proj"] * 3
    assert [piece.location.file.parent.name for piece in down.pieces] == ["expert1", "expert2", "expert3"]
    assert jobs["model.layers.0.mlp.gate.weight"].shape == (3, HIDDEN)
    assert not any("block_sparse_moe" in name for name in jobs)


def test_residual_scale_applies_to_down_proj_only_and_noise_to_every_part(tiny_models: TinyModels) -> None:
    config = parse_config(
        f"base_model: {tiny_models.base}\nexperts:\n"
        f"  - source_model: {tiny_models.experts[0]}\n    positive_prompts: [x]\n    residual_scale: 0.5\n"
        f"  - source_model: {tiny_models.experts[1]}\n    positive_prompts: [y]\n    noise_scale: 0.01\n"
    )
    sources = tuple(load_source(str(folder)) for folder in tiny_models.experts[:2])
    plan = build_plan(config, load_source(str(tiny_models.base)), sources, seed=5)
    jobs = {job.name: job.pieces[0] for job in plan.jobs if job.pieces}

    assert jobs["model.layers.0.block_sparse_moe.experts.0.w2.weight"].multiplier == 0.5
    assert jobs["model.layers.0.block_sparse_moe.experts.0.w1.weight"].multiplier is None
    assert not jobs["model.layers.0.block_sparse_moe.experts.0.w3.weight"].transformed
    noisy = [jobs[f"model.layers.0.block_sparse_moe.experts.1.{w}.weight"] for w in ("w1", "w2", "w3")]
    assert all(piece.noise_scale == 0.01 and piece.multiplier is None for piece in noisy)
    assert len({piece.noise_seed for piece in noisy}) == 3


def test_parameter_counts_match_the_mixtral_shape(three_expert_plan: MergePlan, tiny_models: TinyModels) -> None:
    attention = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    per_expert_layer = 3 * INTERMEDIATE * HIDDEN
    shared = 2 * VOCAB * HIDDEN + HIDDEN + LAYERS * (attention + 2 * HIDDEN)
    routers = LAYERS * 3 * HIDDEN

    assert three_expert_plan.total_parameters == shared + routers + LAYERS * 3 * per_expert_layer
    assert three_expert_plan.active_parameters == shared + routers + LAYERS * 2 * per_expert_layer
    one_active = plan_for(tiny_models.base, list(tiny_models.experts), "experts_per_token: 1\n")
    assert one_active.active_parameters == shared + routers + LAYERS * 1 * per_expert_layer
    assert three_expert_plan.output_bytes == 4 * three_expert_plan.total_parameters


def test_default_shard_size_writes_one_shard(three_expert_plan: MergePlan) -> None:
    assert three_expert_plan.shard_count == 1
    assert three_expert_plan.shard_name(0) == "model-00001-of-00001.safetensors"


@pytest.mark.parametrize("shard_bytes", [100_000, 300_000, 9_000_000])
def test_shards_are_filled_in_order_until_the_next_tensor_would_not_fit(
    tiny_models: TinyModels, shard_bytes: int
) -> None:
    plan = plan_for(tiny_models.base, list(tiny_models.experts), shard_bytes=shard_bytes)
    shards = [plan.shard_jobs(shard) for shard in range(plan.shard_count)]

    assert [job.shard for job in plan.jobs] == sorted(job.shard for job in plan.jobs)
    assert [job for shard in shards for job in shard] == list(plan.jobs)
    assert all(shard for shard in shards)
    for shard in shards:
        assert len(shard) == 1 or sum(job.nbytes for job in shard) <= shard_bytes
    for current, following in itertools.pairwise(shards):
        assert sum(job.nbytes for job in current) + following[0].nbytes > shard_bytes
    assert plan.shard_count > 1
    assert (
        plan.shard_name(plan.shard_count - 1) == f"model-{plan.shard_count:05d}-of-{plan.shard_count:05d}.safetensors"
    )


def test_dtype_comes_from_override_then_config_then_base(tiny_models: TinyModels) -> None:
    experts = list(tiny_models.experts[:2])

    assert plan_for(tiny_models.base, experts).dtype == "F32"
    assert plan_for(tiny_models.base, experts, "dtype: bfloat16\n").dtype == "BF16"
    assert plan_for(tiny_models.base, experts, "dtype: bfloat16\n", dtype_override="float16").dtype == "F16"
    halved = plan_for(tiny_models.base, experts, "dtype: float16\n")
    assert halved.output_bytes == 2 * halved.total_parameters
    assert halved.output_config["torch_dtype"] == "float16"


def test_output_config_carries_the_base_fields(tiny_models: TinyModels, tmp_path: Path) -> None:
    base = tmp_path / "long-context-base"
    shutil.copytree(tiny_models.base, base)
    config = json.loads((base / "config.json").read_text())
    config.update(
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        sliding_window=256,
        bos_token_id=5,
        eos_token_id=6,
        head_dim=16,
    )
    (base / "config.json").write_text(json.dumps(config))

    plan = plan_for(base, list(tiny_models.experts), "experts_per_token: 1\n")
    output = plan.output_config

    assert output["architectures"] == ["MixtralForCausalLM"]
    assert output["model_type"] == "mixtral"
    expected = {
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024,
        "sliding_window": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 5,
        "eos_token_id": 6,
        "head_dim": 16,
        "num_local_experts": 3,
        "num_experts_per_tok": 1,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
    }
    assert {key: output[key] for key in expected} == expected
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(output))
    loaded = AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.model_type == "mixtral"
    assert loaded.rope_parameters["rope_theta"] == 1_000_000.0
    assert (loaded.sliding_window, loaded.num_local_experts, loaded.num_experts_per_tok) == (256, 3, 1)


def test_tied_base_gives_a_tied_output_without_lm_head(tiny_models: TinyModels) -> None:
    plan = plan_for(tiny_models.llama_tied, list(tiny_models.llama_tied_experts))

    assert plan.output_config["tie_word_embeddings"] is True
    assert plan.output_config["sliding_window"] is None
    assert "lm_head.weight" not in {job.name for job in plan.jobs}
    last_copied = [job.name for job in plan.jobs if job.computed is None][-1]
    assert last_copied == "model.norm.weight"


def test_tokenizer_files_present_in_the_base_are_copied(three_expert_plan: MergePlan, tiny_models: TinyModels) -> None:
    assert {path.name for path in three_expert_plan.tokenizer_files} == {
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert all(path.parent == load_source(str(tiny_models.base)).path for path in three_expert_plan.tokenizer_files)


def test_plan_keeps_the_experts_in_config_order(three_expert_plan: MergePlan) -> None:
    assert [expert.path.name for expert in three_expert_plan.experts] == ["expert1", "expert2", "expert3"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("100KB", 100_000), ("1234", 1234)],
)
def test_parse_size_understands_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five gigs", "0", "10XB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match="Shard size"):
        parse_size(text)


def test_a_plan_whose_tensors_differ_from_what_its_config_json_implies_is_refused_as_a_bug(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    implied = planning.expected_tensors

    def with_one_more(*args: object) -> dict[str, tuple[int, ...]]:
        return {**implied(*args), "model.extra.weight": (1,)}

    monkeypatch.setattr(planning, "expected_tensors", with_one_more)
    with pytest.raises(InternalError, match=r"differ from those its config.json implies \(model.extra.weight\)"):
        plan_for(tiny_models.base, list(tiny_models.experts))
