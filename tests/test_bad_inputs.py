"""Every bad input of issue 3 through the real CLI: one clear message, the right exit code, no traceback, no output.

Exit codes: 2 bad config, 3 bad model, 4 I/O. Each test breaks one thing in real files (a config, a
model folder, a safetensors shard) and checks what the user is told and that nothing was written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file, save_file

from frankenmoe.checkpoint.output_rules import partial_folder
from frankenmoe.cli.app import run_reporting_errors
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import MAX_HEADER_BYTES, read_header
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

CONFIG_ERROR, MODEL_ERROR = 2, 3
LABELS = {CONFIG_ERROR: "config error", MODEL_ERROR: "model error"}
SHARD = "model.safetensors"


def merge_refused(config: Path, out: Path, exit_code: int, *fragments: str) -> str:
    """Run a merge that must fail; return its one-line message after checking the common promises."""
    result = run_cli("merge", config, out)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"{LABELS[exit_code]}: "), result.stderr
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not out.exists()
    assert not partial_folder(out).exists()
    return message


def config_data(tiny_models: TinyModels, **top_level: Any) -> dict[str, Any]:
    return {
        "base_model": str(tiny_models.base),
        "gate_mode": "hidden",
        "experts": [
            {"source_model": str(expert), "positive_prompts": [f"prompt for expert {index}"]}
            for index, expert in enumerate(tiny_models.experts)
        ],
        **top_level,
    }


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def clone_model(source: Path, target: Path, *, copy: tuple[str, ...] = (), **config_changes: Any) -> Path:
    """A model folder that links to `source`'s files, with real copies of `copy` and an edited config.json."""
    target.mkdir()
    for item in source.iterdir():
        if item.name == "config.json" or item.name in copy:
            shutil.copyfile(item, target / item.name)
        else:
            (target / item.name).symlink_to(item)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


# --- bad config ---------------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = tmp_path / "moe.yaml"
    config.write_text(
        f"base_model: {tiny_models.base}\nexperts:\n  - source_model: {tiny_models.experts[0]}\n"
        '   positive_prompts: ["code"]\n'
    )
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, str(config), "not valid YAML", "line 4, column 4")


@pytest.mark.parametrize(
    ("mutate", "path", "suggestion"),
    [
        (lambda data: data.update(experts_per_tokens=2), "`experts_per_tokens`", "`experts_per_token`"),
        (lambda data: data.update(gate_mod="random"), "`gate_mod`", "`gate_mode`"),
        (
            lambda data: data["experts"][1].update(postive_prompts=data["experts"][1].pop("positive_prompts")),
            "`experts[1].postive_prompts`",
            "`positive_prompts`",
        ),
    ],
    ids=["top-level", "top-level-gate", "inside-expert"],
)
def test_misspelt_key_names_its_path_and_the_nearest_valid_key(
    tmp_path: Path, tiny_models: TinyModels, mutate: Any, path: str, suggestion: str
) -> None:
    data = config_data(tiny_models)
    mutate(data)
    config = write_yaml(tmp_path / "moe.yaml", data)
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, f"unknown key {path}", f"Did you mean {suggestion}?")


def test_unknown_key_without_a_near_match_lists_the_valid_keys(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = write_yaml(tmp_path / "moe.yaml", config_data(tiny_models, zzz=1))
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, "unknown key `zzz`", "Valid keys here: base_model")


@pytest.mark.parametrize(
    ("mutate", "path", "expected"),
    [
        (lambda data: data.update(experts_per_token="two"), "`experts_per_token`", "must be a whole number"),
        (lambda data: data["experts"][2].update(positive_prompts=[42]), "`experts[2].positive_prompts[0]`", "a string"),
        (lambda data: data.update(experts="a, b"), "`experts`", "must be a list"),
        (lambda data: data["experts"][0].update(source_model=7), "`experts[0].source_model`", "a non-empty string"),
    ],
    ids=["experts_per_token-string", "prompt-number", "experts-string", "source_model-number"],
)
def test_wrong_type_names_the_path_and_the_expected_type(
    tmp_path: Path, tiny_models: TinyModels, mutate: Any, path: str, expected: str
) -> None:
    data = config_data(tiny_models)
    mutate(data)
    config = write_yaml(tmp_path / "moe.yaml", data)
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, path, expected)


@pytest.mark.parametrize("experts_per_token", [0, 4, -1])
def test_experts_per_token_out_of_range_states_the_allowed_range(
    tmp_path: Path, tiny_models: TinyModels, experts_per_token: int
) -> None:
    config = write_yaml(tmp_path / "moe.yaml", config_data(tiny_models, experts_per_token=experts_per_token))
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, f"is {experts_per_token}", "between 1 and 3")


def test_empty_experts_list_is_refused(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = write_yaml(tmp_path / "moe.yaml", {"base_model": str(tiny_models.base), "experts": []})
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, "`experts` is empty")


def test_expert_without_source_model_names_its_path(tmp_path: Path, tiny_models: TinyModels) -> None:
    data = config_data(tiny_models)
    del data["experts"][1]["source_model"]
    config = write_yaml(tmp_path / "moe.yaml", data)
    merge_refused(config, tmp_path / "out", CONFIG_ERROR, "`experts[1].source_model` is required")


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_missing_prompts_for_a_prompt_gate_mode_name_the_expert(
    tmp_path: Path, tiny_models: TinyModels, gate_mode: str
) -> None:
    data = config_data(tiny_models, gate_mode=gate_mode)
    del data["experts"][2]["positive_prompts"]
    config = write_yaml(tmp_path / "moe.yaml", data)
    merge_refused(
        config, tmp_path / "out", CONFIG_ERROR, f"experts[2] ({tiny_models.experts[2]})", "no `positive_prompts`"
    )


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    merge_refused(tmp_path / "absent.yaml", tmp_path / "out", CONFIG_ERROR, "absent.yaml does not exist")


# --- bad model ----------------------------------------------------------------------------------------------------


def test_missing_model_folder_names_the_model_and_where_it_looked(tmp_path: Path, tiny_models: TinyModels) -> None:
    missing = tmp_path / "no-such-model"
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [tiny_models.experts[0], missing])
    merge_refused(config, tmp_path / "out", MODEL_ERROR, f"'{missing}' does not exist", f"looked for {missing}")


def test_model_folder_without_config_json_names_the_model(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.experts[1], tmp_path / "expert")
    (folder / "config.json").unlink()
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [tiny_models.experts[0], folder])
    merge_refused(config, tmp_path / "out", MODEL_ERROR, f"Model {folder}", "has no config.json")


def test_model_folder_without_weights_says_what_was_looked_for(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.base, tmp_path / "base")
    (folder / SHARD).unlink()
    config = write_config(tmp_path / "moe.yaml", folder, tiny_models.experts)
    merge_refused(
        config, tmp_path / "out", MODEL_ERROR, f"Model {folder}", "has no weights", "model.safetensors.index.json"
    )


def test_pickle_only_model_is_refused_without_unpickling(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.experts[0], tmp_path / "expert")
    (folder / SHARD).unlink()
    # Unpickling this file would create `marker`: proof that frankenmoe never calls pickle.load on weights.
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesFolderWhenUnpickled(str(marker))))
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [tiny_models.experts[1], folder])
    merge_refused(config, tmp_path / "out", MODEL_ERROR, "pytorch_model.bin", "never unpickles", "safetensors")
    assert not marker.exists()


class _CreatesFolderWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def test_expert_with_different_shape_names_both_models_the_field_and_both_values(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    wider = write_toy_model(tmp_path / "wider", shape=ToyShape(intermediate_size=96), mlp_seed=5)
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [tiny_models.experts[0], wider])
    merge_refused(
        config,
        tmp_path / "out",
        MODEL_ERROR,
        f"experts[1] ({wider})",
        f"base model ({tiny_models.base})",
        "intermediate_size is 96 in the expert but 128 in the base",
    )


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3"])
def test_unsupported_model_type_lists_what_is_supported(
    tmp_path: Path, tiny_models: TinyModels, model_type: str
) -> None:
    folder = clone_model(tiny_models.experts[0], tmp_path / model_type, model_type=model_type)
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [folder, tiny_models.experts[1]])
    merge_refused(
        config,
        tmp_path / "out",
        MODEL_ERROR,
        f"model_type '{model_type}'",
        "Supported source model types: llama, mistral, qwen2, qwen3",
    )


def _truncate_to_half(shard: Path) -> str:
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return "ends at byte"


def _truncate_to_five_bytes(shard: Path) -> str:
    with shard.open("r+b") as handle:
        handle.truncate(5)
    return "too short to hold a header"


def _flip_header_bytes(shard: Path) -> str:
    with shard.open("r+b") as handle:
        handle.seek(8)
        first = handle.read(4)
        handle.seek(8)
        handle.write(bytes(byte ^ 0xFF for byte in first))
    return "header is not valid JSON"


def _header_longer_than_file(shard: Path) -> str:
    with shard.open("r+b") as handle:
        handle.write(struct.pack("<Q", shard.stat().st_size))
    return "but the file has only"


def _header_length_beyond_limit(shard: Path) -> str:
    with shard.open("r+b") as handle:
        handle.write(struct.pack("<Q", 2**63))
    return f"the limit is {MAX_HEADER_BYTES}"


def _tensor_data_out_of_range(shard: Path) -> str:
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin, end + 10**12]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    return "tensor 'model.norm.weight' ends at byte"


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_to_half,
        _truncate_to_five_bytes,
        _flip_header_bytes,
        _header_longer_than_file,
        _header_length_beyond_limit,
        _tensor_data_out_of_range,
    ],
    ids=lambda damage: damage.__name__.strip("_"),
)
def test_damaged_safetensors_names_the_file(tmp_path: Path, tiny_models: TinyModels, damage: Any) -> None:
    folder = clone_model(tiny_models.base, tmp_path / "base", copy=(SHARD,))
    detail = damage(folder / SHARD)
    config = write_config(tmp_path / "moe.yaml", folder, tiny_models.experts)
    merge_refused(config, tmp_path / "out", MODEL_ERROR, f"{folder / SHARD} is not a valid safetensors file", detail)


@pytest.mark.parametrize("claimed_length", [MAX_HEADER_BYTES - 8, 2**40, 2**64 - 1])
def test_header_length_is_checked_before_anything_is_allocated(tmp_path: Path, claimed_length: int) -> None:
    shard = tmp_path / "lying.safetensors"
    shard.write_bytes(struct.pack("<Q", claimed_length) + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match=r"lying\.safetensors"):
            read_header(shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_index_naming_a_missing_shard_names_that_shard(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.base, tmp_path / "base")
    (folder / SHARD).rename(folder / "model-00001-of-00002.safetensors")
    names = list(read_header(tiny_models.base / SHARD))
    weight_map = {name: f"model-0000{1 + index % 2}-of-00002.safetensors" for index, name in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = write_config(tmp_path / "moe.yaml", folder, tiny_models.experts)
    merge_refused(config, tmp_path / "out", MODEL_ERROR, "names shard 'model-00002-of-00002.safetensors'")


def _rewrite_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    tensors = load_file(folder / SHARD)
    tensors[name] = tensor
    (folder / SHARD).unlink()
    save_file(tensors, folder / SHARD)


def test_source_tensor_with_integer_dtype_is_named(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.base, tmp_path / "base")
    name = "model.layers.1.self_attn.q_proj.weight"
    _rewrite_tensor(folder, name, torch.ones(64, 64, dtype=torch.int32))
    config = write_config(tmp_path / "moe.yaml", folder, tiny_models.experts)
    merge_refused(config, tmp_path / "out", MODEL_ERROR, f"Tensor '{name}' in model {folder}", "has dtype I32")


def test_expert_tensor_with_wrong_shape_is_named(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.experts[1], tmp_path / "expert")
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite_tensor(folder, name, torch.zeros(128, 64))
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [tiny_models.experts[0], folder])
    merge_refused(
        config, tmp_path / "out", MODEL_ERROR, f"Tensor '{name}' in model {folder}", "shape [128, 64]", "[64, 128]"
    )


# --- prompts ------------------------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_truncated_with_a_warning(tmp_path: Path, tiny_models: TinyModels) -> None:
    long_prompt = "the quick brown fox jumps over the lazy dog " * 80
    prompts = [[long_prompt], ["once upon a time"], ["solve the equation"]]
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, prompts=prompts)
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.stderr.splitlines() if line.startswith("WARNING: "))
    assert "Prompt 'the quick brown fox jumps over the lazy ...' is 882 tokens long" in warning
    assert "more than the model's context of 512; it was truncated to the first 512 tokens" in warning
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").is_file()


# --- security and error reporting ---------------------------------------------------------------------------------


def test_tokenizer_remote_code_is_never_executed(tmp_path: Path, tiny_models: TinyModels) -> None:
    folder = clone_model(tiny_models.base, tmp_path / "base")
    marker = tmp_path / "remote-code-ran"
    (folder / "tokenization_evil.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\nfrom transformers import LlamaTokenizer\n"
        "class EvilTokenizer(LlamaTokenizer):\n    pass\n"
    )
    tokenizer_config = json.loads((tiny_models.base / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = write_config(tmp_path / "moe.yaml", folder, tiny_models.experts[:2])
    result = run_cli("merge", config, tmp_path / "out")
    # The tokenizer loads with its own transformers class (auto_map ignored) or is refused; both are safe.
    assert result.exit_code in (0, MODEL_ERROR), result.output
    assert not marker.exists()


def test_verbose_adds_the_traceback_and_keeps_the_exit_code(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = write_yaml(tmp_path / "moe.yaml", config_data(tiny_models, experts_per_token=0))
    quiet = run_cli("merge", config, tmp_path / "out")
    verbose = run_cli("merge", config, tmp_path / "out", "--verbose")
    assert quiet.exit_code == verbose.exit_code == CONFIG_ERROR
    assert "Traceback" not in quiet.stderr
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_unanticipated_os_error_is_an_io_error_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    def action() -> None:
        raise PermissionError(13, "Permission denied", "/somewhere/locked")

    with pytest.raises(typer.Exit) as raised:
        run_reporting_errors(action, verbose=False)
    assert raised.value.exit_code == 4
    errors = capsys.readouterr().err
    assert errors.startswith("I/O error: An unexpected file-system error stopped the run: [Errno 13] Permission denied")
    assert "/somewhere/locked" in errors
    assert "Traceback" not in errors
