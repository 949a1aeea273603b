"""A merge written straight to one GGUF file, for llama.cpp, Ollama and LM Studio.

The GGUF is made from the same merge plan as the safetensors output and holds what llama.cpp's
`convert_hf_to_gguf.py` writes from that safetensors output at the same type, tensor for tensor and
bit for bit (tests/test_gguf_output.py compares them): each tensor is first made exactly as the
safetensors writer makes it (in the plan's dtype), then encoded as the converter's `gguf.quants.quantize`
encodes its float32 values: F32/F16/BF16 and Q8_0 by torch code that gives the same bits
(tests/test_gguf_encoding.py), the legacy quants by the gguf package itself. Routed experts are stacked per layer
into `blk.N.ffn_{gate,up,down}_exps`, Llama's query/key rows are permuted as llama.cpp's rope pairs
them, norms, biases, routers and shared-expert gates stay float32, and a tensor whose rows do not
split into the type's blocks falls back to float16 (the dry run lists which).

Writing is two-phase and streamed: every tensor is declared first (name, shape, type, size: GGUF puts
the tensor table before the data), then each tensor is produced, encoded and written a block of
rows at a time (at most ROW_BLOCK_BYTES of float32), so memory stays bounded whatever the model's
size; producing, encoding (on `slice_workers` threads) and writing (on the file's own thread)
overlap. The file's sha256 is computed from the bytes as they are written. The file goes into the same
staging folder, with the same manifest, model card and atomic swap as a safetensors merge.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from frankenmoe.architectures import OutputArchitecture, OutputLayout
from frankenmoe.errors import ConfigError, ModelError, OutputError
from frankenmoe.gguf_tables import (
    BPE,
    F32_TENSOR_KINDS,
    FALLBACK_TYPE,
    GGUF_ARCHITECTURES,
    GGUF_TYPES,
    LLAMA_HF,
    PRE_TOKENIZER_HASHES,
    PRE_TOKENIZER_TEXT,
    SENTENCEPIECE,
    GgufArchitecture,
    GgufType,
)
from frankenmoe.manifest import FileRecord
from frankenmoe.plan import MergePlan, TensorJob, TensorPiece
from frankenmoe.routers.request import Gates
from frankenmoe.tensor_io import DTYPES, WRITEBACK_BYTES, read_rows, start_writeback
from frankenmoe.write import produce_piece

if TYPE_CHECKING:
    import gguf

    from frankenmoe.pipeline import MergeResult, PreparedMerge

ROW_BLOCK_BYTES = 4 * 1024 * 1024
"""Float32 bytes of one tensor's rows produced, encoded and written at a time: a few MiB stay in the CPU's cache
(16 MiB blocks cost a third more CPU time and 50 MB more memory on the small benchmark shape)."""
GGUF_NAME = "model-{type}.gguf"
"""The GGUF file's name inside OUT, e.g. model-Q8_0.gguf."""


def gguf_type(name: str) -> GgufType:
    """The `--gguf-type` called `name`; a ConfigError listing the types for any other name."""
    entry = GGUF_TYPES.get(name.strip().lower())
    if entry is None:
        raise ConfigError(
            f"GGUF type {name!r} is not one frankenmoe writes. Use one of: {', '.join(GGUF_TYPES)}. For K-quants "
            "(Q4_K_M and the like), write bf16 or f16 and run llama.cpp's `llama-quantize` on the file (docs/gguf.md)."
        )
    return entry


def gguf_file_name(entry: GgufType) -> str:
    return GGUF_NAME.format(type=entry.tensor_type.name)


@dataclass(frozen=True)
class GgufTensor:
    """One GGUF tensor: its name, shape (PyTorch order), type, and the plan jobs whose rows fill it, in order."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    """gguf.GGMLQuantizationType."""
    jobs: tuple[TensorJob, ...] = ()
    permute_heads: tuple[int, int] | None = None
    """(heads, heads of this projection): rows regrouped per head as llama.cpp's llama rope expects."""
    values: tuple[float, ...] = ()
    """A tensor computed from the config alone (llama3 rope frequencies)."""
    fallback: bool = False
    """Written as FALLBACK_TYPE because its rows do not divide into the requested type's blocks."""

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, block_bytes = GGML_QUANT_SIZES[self.tensor_type]
        return math.prod(self.shape) // block * block_bytes


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as llama.cpp stores it: tokens, scores, token types, and the special-token record."""

    model: str
    pre: str
    tokens: list[str] | list[bytes]
    token_types: list[int]
    scores: list[float] | None
    special: Any
    """gguf.SpecialVocab: merges, special token ids, add_bos/add_eos, chat template."""
    add_space_prefix: bool | None = None


@dataclass(frozen=True)
class GgufPlan:
    """Everything decided before a GGUF is written: the merge plan, the type, every tensor, the tokenizer."""

    config: dict[str, Any]
    """The output's config.json."""
    output: OutputArchitecture
    type: GgufType
    architecture: GgufArchitecture
    tensors: tuple[GgufTensor, ...]
    vocabulary: Vocabulary
    name: str

    @property
    def file_name(self) -> str:
        return gguf_file_name(self.type)

    @property
    def data_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def fallbacks(self) -> tuple[GgufTensor, ...]:
        return tuple(tensor for tensor in self.tensors if tensor.fallback)


def plan_gguf(plan: MergePlan, type_name: str, name: str, tokenizer_folder: Path | None = None) -> GgufPlan:
    """Decide every GGUF tensor and read the tokenizer; refuses what llama.cpp could not run, before writing.

    `tokenizer_folder` holds the tokenizer files (a checkpoint being converted); by default they are
    the plan's (the base model's), read beside the output's config.json as the converter reads them.
    """
    with _tokenizer_view(plan, tokenizer_folder) as folder:
        return gguf_plan_for(plan.jobs, plan.output_config, plan.architecture, plan.layout, type_name, name, folder)


def gguf_plan_for(
    jobs: tuple[TensorJob, ...],
    config: dict[str, Any],
    output: OutputArchitecture,
    layout: OutputLayout,
    type_name: str,
    name: str,
    tokenizer_folder: Path,
) -> GgufPlan:
    """The GGUF plan of an output described by its tensor jobs and config.json (a merge's, or a checkpoint's)."""
    entry = gguf_type(type_name)
    architecture = GGUF_ARCHITECTURES.get(output.model_type)
    if architecture is None:
        raise ConfigError(f"Writing {output.model_type} as GGUF is not supported; write safetensors.")
    if any(tensor.stacked for tensor in layout.expert_tensors):
        raise ConfigError(
            f"Layout {layout.name} names safetensors tensors; a GGUF stacks the experts its own way. "
            "Leave --layout out with --format gguf (or convert a classic-layout checkpoint)."
        )
    mismatch = output.llama_cpp_mismatch(config)
    if mismatch is not None:  # a GGUF is for llama.cpp: one it would compute differently is refused
        raise ConfigError(mismatch)
    tensors = tuple(_gguf_tensors(jobs, config, output, layout, architecture, entry))
    vocabulary = read_vocabulary(tokenizer_folder, config, architecture)
    return GgufPlan(config, output, entry, architecture, tensors, vocabulary, name)


def _gguf_tensors(
    all_jobs: tuple[TensorJob, ...],
    config: dict[str, Any],
    output: OutputArchitecture,
    layout: OutputLayout,
    architecture: GgufArchitecture,
    entry: GgufType,
) -> Iterator[GgufTensor]:
    """The GGUF tensors in the jobs' order; each layer's routed experts stacked where its last expert was."""
    from gguf import get_tensor_name_map

    layers = int(config["num_hidden_layers"])
    experts = int(config[output.expert_count_key])
    names = get_tensor_name_map(architecture.arch, layers)
    stacks: dict[str, tuple[str, int]] = {}
    for layer in range(layers):
        for part, stack in zip(("gate_proj", "up_proj", "down_proj"), architecture.expert_stack, strict=True):
            template = next(tensor.template for tensor in layout.expert_tensors if tensor.parts == (part,))
            for expert in range(experts):
                stacks[template.format(layer=layer, expert=expert)] = (stack.format(layer=layer), expert)
    jobs = {job.name: job for job in all_jobs}
    stacked: dict[str, list[TensorJob]] = {}
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    rope = _rope_parameters(config)
    if architecture.permute_qk and rope.get("rope_type") == "llama3":
        values = llama3_rope_factors(config, rope)
        yield GgufTensor(
            "rope_freqs.weight", (len(values),), _type_for("rope_freqs.weight", (len(values),), entry)[0], values=values
        )
    for job in all_jobs:
        if job.name in stacks:
            stack, expert = stacks[job.name]
            stacked.setdefault(stack, []).append(job)
            if expert == experts - 1:
                members = stacked.pop(stack)
                shape = (len(members), *members[0].shape)
                yield _tensor(stack, shape, entry, tuple(members))
            continue
        gguf_name = names.get_name(job.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"llama.cpp's {architecture.name} architecture has no tensor for {job.name}.")
        permute = None
        if architecture.permute_qk and job.name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = (heads, heads)
        elif architecture.permute_qk and job.name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = (heads, kv_heads)
        yield _tensor(gguf_name, job.shape, entry, (jobs[job.name],), permute)


def _tensor(
    name: str,
    shape: tuple[int, ...],
    entry: GgufType,
    jobs: tuple[TensorJob, ...],
    permute: tuple[int, int] | None = None,
) -> GgufTensor:
    tensor_type, fallback = _type_for(name, shape, entry)
    return GgufTensor(name, shape, tensor_type, jobs, permute, fallback=fallback)


def _type_for(name: str, shape: tuple[int, ...], entry: GgufType) -> tuple[Any, bool]:
    """llama.cpp's converter's rule: float32 for 1-D tensors, norms, biases, routers; else the type, or F16
    when the rows do not divide into its blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = name.split(".")[-2] if name.startswith("blk.") else ""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or kind in F32_TENSOR_KINDS:
        return GGMLQuantizationType.F32, False
    block, _ = GGML_QUANT_SIZES[entry.tensor_type]
    if shape[-1] % block:
        return FALLBACK_TYPE, True
    return entry.tensor_type, False


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings as the converter reads them from config.json (rope_parameters, else rope_scaling)."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in parameters and config.get("rope_theta") is not None:
        parameters["rope_theta"] = config["rope_theta"]
    if "rope_type" not in parameters and parameters.get("type") is not None:
        parameters["rope_type"] = parameters["type"]
    return parameters


def llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any]) -> tuple[float, ...]:
    """Llama 3's per-frequency rope scaling, which llama.cpp reads from a `rope_freqs` tensor."""
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    frequencies = 1.0 / (
        rope.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    )
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for frequency in frequencies.tolist():
        wavelength = 2 * math.pi / frequency
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(float(factor))
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


class _TokenizerView:
    """A scratch folder holding the tokenizer files and the output's config.json (what the converter reads)."""

    def __init__(self, plan: MergePlan, folder: Path | None) -> None:
        self._plan, self._folder = plan, folder
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self._folder is not None:
            return self._folder
        self._scratch = tempfile.TemporaryDirectory(prefix="frankenmoe-gguf-")
        folder = Path(self._scratch.name)
        for source in self._plan.tokenizer_files:
            shutil.copyfile(source, folder / source.name)
        (folder / "config.json").write_text(json.dumps(self._plan.output_config, indent=2) + "\n", encoding="utf-8")
        return folder

    def __exit__(self, *_: object) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


def _tokenizer_view(plan: MergePlan, folder: Path | None) -> _TokenizerView:
    return _TokenizerView(plan, folder)


def read_vocabulary(folder: Path, config: dict[str, Any], architecture: GgufArchitecture) -> Vocabulary:
    """The tokenizer in `folder` as llama.cpp stores it, read the way its converter reads it for this architecture."""
    import gguf

    present = {kind for kind, marker in _TOKENIZER_MARKERS.items() if (folder / marker).is_file()}
    kind = next((kind for kind in architecture.tokenizers if kind in present), None)
    if kind is None:
        wanted = " or ".join(_TOKENIZER_MARKERS[kind] for kind in architecture.tokenizers)
        raise ModelError(
            f"The base model has no tokenizer llama.cpp's {architecture.name} architecture can read (it needs "
            f"{wanted}), so a GGUF of this merge would not run. Add the base model's tokenizer files to its folder, "
            "or write safetensors (leave --format out)."
        )
    add_space_prefix = _tokenizer_config(folder).get("add_prefix_space") if architecture.permute_qk else None
    if kind == SENTENCEPIECE:
        tokens, scores, types = _sentencepiece_tokens(folder, config)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        return Vocabulary("llama", "default", tokens, types, scores, special, add_space_prefix)
    if kind == LLAMA_HF:
        try:
            hf_vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError):  # GPT-2-style BPE files: gguf says it found no Llama BPE tokenizer
            hf_vocab = None  # not a SentencePiece-style tokenizer.json: llama.cpp reads it as BPE
        if hf_vocab is not None:
            entries = list(hf_vocab.all_tokens())
            special = gguf.SpecialVocab(folder, n_vocab=len(entries))
            return Vocabulary(
                "llama",
                "default",
                [text for text, _, _ in entries],
                [int(kind) for _, _, kind in entries],
                [score for _, score, _ in entries],
                special,
                add_space_prefix,
            )
    tokens, types, pre = _bpe_tokens(folder, config)
    special = gguf.SpecialVocab(folder, load_merges=True)
    return Vocabulary("gpt2", pre, tokens, types, None, special, add_space_prefix)


_TOKENIZER_MARKERS = {SENTENCEPIECE: "tokenizer.model", LLAMA_HF: "tokenizer.json", BPE: "tokenizer.json"}


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp treats as control tokens even when the tokenizer does not mark them special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _sentencepiece_tokens(folder: Path, config: dict[str, Any]) -> tuple[list[bytes], list[float], list[int]]:
    """tokenizer.model's pieces, scores and types, with added and special tokens as llama.cpp records them."""
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(folder / "tokenizer.model"))
    size = int(config.get("vocab_size") or processor.vocab_size())
    tokens = [f"[PAD{index}]".encode() for index in range(size)]
    scores = [-10000.0] * size
    types = [int(TokenType.UNUSED)] * size
    for index in range(min(size, processor.vocab_size())):
        kind = TokenType.NORMAL
        if processor.IsUnknown(index):
            kind = TokenType.UNKNOWN
        elif processor.IsControl(index):
            kind = TokenType.CONTROL
        elif processor.IsUnused(index):
            kind = TokenType.UNUSED
        elif processor.IsByte(index):
            kind = TokenType.BYTE
        tokens[index] = processor.IdToPiece(index).encode("utf-8")
        scores[index] = processor.GetScore(index)
        types[index] = int(kind)
    added = folder / "added_tokens.json"
    if added.is_file():
        for text, index in json.loads(added.read_text(encoding="utf-8")).items():
            if index < size:
                tokens[index], scores[index], types[index] = text.encode("utf-8"), -1000.0, int(TokenType.USER_DEFINED)
    for key, data in _tokenizer_config(folder).get("added_tokens_decoder", {}).items():
        index, text = int(key), str(data["content"])
        if index >= size:
            continue
        if data.get("special") or _looks_special(text):
            types[index] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalised
            types[index] = int(TokenType.USER_DEFINED)
        scores[index], tokens[index] = -1000.0, text.encode("utf-8")
    return tokens, scores, types


def _bpe_tokens(folder: Path, config: dict[str, Any]) -> tuple[list[str], list[int], str]:
    """tokenizer.json's byte-level BPE vocabulary and the name llama.cpp gives its pre-tokenizer."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZER_HASHES.get(digest)
    if pre is None:
        raise ModelError(
            f"The base model's BPE tokenizer splits text in a way llama.cpp does not know by name (its pre-tokenizer "
            f"hash is {digest}), so llama.cpp would tokenize wrongly. frankenmoe knows: "
            f"{', '.join(sorted(set(PRE_TOKENIZER_HASHES.values())))}. Write safetensors (leave --format out) and, "
            "if a newer llama.cpp knows this tokenizer, convert with its convert_hf_to_gguf.py."
        )
    vocab = tokenizer.get_vocab()
    size = int(config.get("vocab_size") or len(vocab))
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
            continue
        if token in added:
            if not decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or _looks_special(token):
                types.append(int(TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, pre


# Writing


def _metadata(writer: gguf.GGUFWriter, gplan: GgufPlan) -> None:
    """The keys llama.cpp's converter writes for this architecture, from the output's config.json."""
    import gguf

    config = gplan.config
    arch = gplan.architecture
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(gplan.name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings") is not None:
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    rope = _rope_parameters(config)
    rope_type = str(rope.get("rope_type", "default")).lower()
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):
        raise ModelError(
            f"The base model's rope scaling {rope_type!r} is not one frankenmoe writes to GGUF (default, linear, yarn, "
            "llama3). Write safetensors (leave --format out) and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(int(config[gplan.output.expert_count_key]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    writer.add_file_type(gplan.type.file_type)
    if arch.writes_vocab_size:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(
            int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        )
    expert_writers = (writer.add_expert_feed_forward_length, writer.add_expert_shared_feed_forward_length)
    for key, add in zip(arch.expert_length_keys, expert_writers, strict=False):
        if config.get(key) is not None:
            add(int(config[key]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabulary = gplan.vocabulary
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.token_types)
    vocabulary.special.add_to_gguf(writer, quiet=True)


def write_gguf(
    gplan: GgufPlan,
    gates: Callable[[], Gates],
    path: Path,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> FileRecord:
    """Write the GGUF file at `path`: declare every tensor, then stream them one by one; the file's record.

    Three stages overlap: this thread produces each tensor's rows a block at a time, the encoding
    workers (one intra-op thread each, as many as `slice_workers`) turn blocks into the type's bytes,
    and the file's own thread writes and hashes them in order. At most QUEUED_BLOCKS blocks wait.
    """
    import gguf
    from gguf.gguf_writer import WriterState

    from frankenmoe.layers import slice_workers

    device = device or torch.device("cpu")
    writer = gguf.GGUFWriter(path=None, arch=gplan.architecture.name)
    for tensor in gplan.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.tensor_type
        )
    _metadata(writer, gplan)
    output = _StreamedFile(path)
    workers = slice_workers()
    try:
        with ThreadPoolExecutor(workers, "frankenmoe-gguf", initializer=torch.set_num_threads, initargs=(1,)) as pool:
            writer.fout = [output]  # type: ignore[list-item]  # GGUFWriter only writes, tells and flushes
            writer.state = WriterState.EMPTY
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            alignment = writer.data_alignment
            for tensor in gplan.tensors:
                output.write(bytes(-output.tell() % alignment))
                block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
                values = 0
                for rows in _tensor_rows(tensor, gates, device):
                    values += rows.numel()
                    encoded = pool.submit(encode_rows, rows, tensor.tensor_type)
                    output.write_later(encoded, rows.numel() // block * block_bytes)
                if values != math.prod(tensor.shape):
                    raise OutputError(
                        f"Writing {tensor.name} produced {values} values, its declared shape {list(tensor.shape)} "
                        f"holds {math.prod(tensor.shape)}."
                    )
                if progress is not None:
                    progress(tensor.nbytes)
            output.write(bytes(-output.tell() % alignment))
            digest = output.close()
    finally:
        output.abort()
    return FileRecord(path.name, path.stat().st_size, digest)


QUEUED_BLOCKS = 4
"""Encoded (or encoding) blocks that may wait for the file's thread: a few tens of MiB at most."""


class _StreamedFile:
    """The GGUF file, written and sha256-hashed in order on a thread of its own.

    os.write and hashlib release the GIL, so writing and hashing overlap producing and encoding the
    next blocks. `write` hands over bytes the caller no longer changes; `write_later` the future of an
    encoding, written once it is done. Written bytes are sent to the disk as they accumulate
    (`start_writeback`), so the final fsync has little left to do.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            raise OutputError(f"Cannot create {path}: {error.strerror or error}.") from None
        self._queue: queue.Queue[tuple[bytes | bytearray | Future[torch.Tensor], int] | None] = queue.Queue(
            QUEUED_BLOCKS
        )
        self._hash = hashlib.sha256()
        self._position = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="frankenmoe-gguf-write", daemon=True)
        self._thread.start()

    def write(self, data: bytes | bytearray) -> int:
        if data:
            self._put(data, len(data))
        return len(data)

    def write_later(self, encoded: Future[torch.Tensor], size: int) -> None:
        """Queue an encoding that will make `size` bytes (the thread checks it does)."""
        self._put(encoded, size)

    def tell(self) -> int:
        """The file's size once everything queued is written."""
        return self._position

    def flush(self) -> None:
        """Nothing to do: GGUFWriter flushes after its header, and every byte goes out in order anyway."""

    def close(self) -> str:
        """Wait for every queued byte to be written and hashed, fsync the file; its sha256."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
        try:
            os.fsync(self._descriptor)
        except OSError as error:
            raise _write_failed(self.path, error) from None
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Stop the thread, dropping what still waits, and close the file; harmless after `close`."""
        if self._thread.is_alive():
            self._error = self._error or OutputError(f"Writing {self.path} was abandoned.")
            with contextlib.suppress(queue.Empty):
                while True:  # make room for the stop signal
                    self._queue.get_nowait()
            self._queue.put(None)
            self._thread.join()
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def _put(self, item: bytes | bytearray | Future[torch.Tensor], size: int) -> None:
        self._raise_error()
        self._queue.put((item, size))
        self._position += size

    def _raise_error(self) -> None:
        if isinstance(self._error, OSError):
            raise _write_failed(self.path, self._error) from None
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        written = flushed = 0
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the producer raises the error at its next write
            data, size = item
            try:
                view = memoryview(data.result().numpy() if isinstance(data, Future) else data).cast("B")
                if len(view) != size:
                    raise OutputError(f"An encoded block of {self.path.name} has {len(view)} bytes, not {size}.")
                while view:
                    count = os.write(self._descriptor, view)
                    self._hash.update(view[:count])
                    view = view[count:]
                written += size
                if written - flushed >= WRITEBACK_BYTES:
                    start_writeback(self._descriptor, flushed, written - flushed)
                    flushed = written
            except BaseException as error:  # raised in the producer's thread
                self._error = error


def _write_failed(path: Path, error: OSError) -> OutputError:
    if error.errno == errno.ENOSPC:
        return OutputError(f"The disk is full: writing {path} failed. Free some space or choose another output folder.")
    return OutputError(f"Writing {path} failed: {error.strerror or error}.")


ENCODE_VALUES = 1 << 18
"""Values encoded at a time inside a block (1 MiB of float32): each step's temporaries stay in the CPU's cache."""
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
"""The largest float32 below 0.5: floor(|y| + this), in float32, rounds |y| half away from zero exactly."""


def encode_rows(rows: torch.Tensor, tensor_type: Any) -> torch.Tensor:
    """`rows` (any float dtype) as `tensor_type`'s bytes (a new uint8 tensor): bit for bit what
    `gguf.quants.quantize` makes of their float32 values, which llama.cpp's converter writes.

    F32, F16 and BF16 are torch conversions (round to nearest even, as numpy's and gguf's); Q8_0 is
    `quantize_q8_0`; the legacy quants call the gguf package on the whole block.
    """
    import gguf

    kind = gguf.GGMLQuantizationType
    if tensor_type in (kind.F32, kind.F16):
        target = torch.float32 if tensor_type == kind.F32 else torch.float16
        encoded = torch.empty(rows.shape, dtype=target)
        encoded.copy_(rows)  # a new tensor even when `rows` already has the type: the writer owns it
        return encoded.reshape(-1).view(torch.uint8)
    if tensor_type == kind.Q8_0:
        return quantize_q8_0(rows)
    if tensor_type == kind.BF16 and rows.dtype == torch.bfloat16:
        # gguf rounds float32 to bfloat16 (exact here) and quiets NaNs by setting their mantissa's top bit.
        bits = rows.reshape(-1).view(torch.int16)
        return torch.where(rows.reshape(-1).isnan(), bits | 0x40, bits).view(torch.uint8)
    return torch.from_numpy(gguf.quants.quantize(rows.float().numpy(), tensor_type).reshape(-1))


def quantize_q8_0(rows: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (a float16 scale d = max|x|/127, then round(x/d) as int8, per 32 values) of `rows`,
    bit for bit as `gguf.quants.quantize` (and so ggml's reference quantiser) makes them.

    The steps are gguf's in float32: d = max|x| / 127, inverse = 1/d (0 where d is 0), q = x * inverse
    rounded half away from zero. A block whose scale or inverse is not finite (NaN or Inf values, or
    values so small that 1/d overflows) is left to gguf itself, so even those bytes are the same.
    """
    import gguf

    values = rows.reshape(-1)
    encoded = torch.empty((values.numel() // 32, 34), dtype=torch.uint8)
    for start in range(0, values.numel(), ENCODE_VALUES):
        blocks = values[start : start + ENCODE_VALUES].float().reshape(-1, 32)
        target = encoded[start // 32 : start // 32 + blocks.shape[0]]
        scale = blocks.abs().amax(dim=1, keepdim=True) / 127
        inverse = torch.where(scale == 0, 0.0, 1.0 / scale)
        if not (bool(scale.isfinite().all()) and bool(inverse.isfinite().all())):
            target.copy_(torch.from_numpy(gguf.quants.quantize(blocks.numpy(), gguf.GGMLQuantizationType.Q8_0)))
            continue
        # floor(a + largest float32 below 0.5) is a half-away-from-zero round of a in float32 (unlike
        # a + 0.5, which rounds 0.49999997 up); the sign of x * inverse is x's, as inverse >= 0.
        quantized = blocks.mul(inverse).abs_().add_(_BELOW_HALF).floor_().copysign_(blocks).to(torch.int8)
        target[:, :2] = scale.to(torch.float16).view(torch.uint8)
        target[:, 2:] = quantized.view(torch.uint8)
    return encoded.reshape(-1)


def _tensor_rows(tensor: GgufTensor, gates: Callable[[], Gates], device: torch.device) -> Iterator[torch.Tensor]:
    """The tensor's rows (seen as a matrix over its last dimension) in the plan's dtype, a bounded block at a time."""
    if tensor.values:
        yield torch.tensor(tensor.values, dtype=torch.float32).reshape(1, -1)
        return
    columns = tensor.shape[-1]
    step = max(1, ROW_BLOCK_BYTES // (columns * 4))
    if tensor.permute_heads is not None:
        whole = torch.cat([block for job in tensor.jobs for block in _job_rows(job, gates, device, step)])
        heads = tensor.permute_heads[1]
        whole = whole.reshape(heads, 2, whole.shape[0] // heads // 2, columns).swapaxes(1, 2).reshape(-1, columns)
        yield from whole.split(step)
        return
    for job in tensor.jobs:
        yield from _job_rows(job, gates, device, step)


def _job_rows(job: TensorJob, gates: Callable[[], Gates], device: torch.device, step: int) -> Iterator[torch.Tensor]:
    """One plan job's rows exactly as the safetensors writer makes them, in the job's dtype."""
    dtype = DTYPES[job.dtype][0]
    columns = job.shape[-1]
    if job.computed is not None:
        rows = gates().rows(job.computed.kind, job.computed.layer)
        yield rows.to(dtype).reshape(-1, columns)
        return
    if job.merged is not None:
        for start in range(0, job.merged.num_rows, step):
            yield job.merged.rows(start, min(start + step, job.merged.num_rows), device).to(dtype).cpu()
        return
    if job.origin == "zeros":
        total = math.prod(job.shape[:-1])
        for start in range(0, total, step):
            yield torch.zeros(min(step, total - start), columns, dtype=dtype)
        return
    for piece in job.pieces:
        if piece.transformed:
            yield from produce_piece(piece, job, device).reshape(-1, columns).split(step)
            continue
        total = math.prod(piece.location.shape[:-1])
        for start in range(0, total, step):
            yield read_rows(piece.location, start, min(start + step, total)).to(dtype)


# The merge


def execute_gguf_merge(prepared: PreparedMerge, gplan: GgufPlan) -> MergeResult:
    """Compute the routers and write OUT as one GGUF file, with config.json, model card and manifest.

    The same stages as a safetensors merge (`pipeline.execute_merge`): laser, routers computed on their
    own thread while the other tensors stream, staging folder, manifest written last, atomic swap. The
    routing check routes prompts through safetensors shards and so does not run here (the card says so).
    """
    from tqdm import tqdm

    from frankenmoe.card import laser_sections, model_card
    from frankenmoe.output import check_complete, staged_output
    from frankenmoe.pipeline import BackgroundResult, record_merge, run_lasers, stage
    from frankenmoe.routers import compute_gates
    from frankenmoe.write import write_text_file

    options = prepared.options
    plan, request, laser_results, timings = run_lasers(prepared)
    gplan = replace(gplan, tensors=tuple(_with_plan_jobs(gplan.tensors, plan)))
    card = model_card(plan, prepared.config_text, (*laser_sections(laser_results), gguf_card_section(gplan)))
    # Whether OUT's checkpoint may be replaced is this merge's own --force, as for a safetensors output.
    with staged_output(prepared.out, replace_checkpoint=options.force) as staging:
        with stage("writing", timings):
            gates = BackgroundResult(lambda: compute_gates(plan.config.gate_mode, request))
            with tqdm(
                total=gplan.data_bytes, desc="writing", unit="B", unit_scale=True, disable=not options.show_progress
            ) as bar:
                record = write_gguf(gplan, gates.result, staging / gplan.file_name, request.device, bar.update)
            records = {record.name: record}
            records["config.json"] = write_text_file(
                staging / "config.json", json.dumps(plan.output_config, indent=2) + "\n"
            )
            records["README.md"] = write_text_file(staging / "README.md", card)
        with stage("verifying", timings):
            problems = gguf_problems(staging / gplan.file_name, gplan)
            if problems:
                raise OutputError(f"Verification of {gplan.file_name} failed: {problems[0]}.")
        check_complete(staging, list(records))
        result = record_merge(prepared, plan, staging, records, timings, laser_results, routing_check=None)
    return result


def _with_plan_jobs(tensors: tuple[GgufTensor, ...], plan: MergePlan) -> Iterator[GgufTensor]:
    """The tensors with their jobs taken from `plan` (the same jobs, with the ranks laser chose)."""
    jobs = {job.name: job for job in plan.jobs}
    for tensor in tensors:
        yield replace(tensor, jobs=tuple(jobs[job.name] for job in tensor.jobs))


@dataclass(frozen=True)
class WrittenTensor:
    """One entry of a GGUF file's tensor table."""

    tensor_type: int
    shape: tuple[int, ...]
    """PyTorch order (GGUF stores the dimensions innermost first)."""
    nbytes: int


@dataclass(frozen=True)
class GgufTable:
    """What checking a GGUF file needs from it: its scalar and string keys and its tensor table."""

    fields: dict[str, str | int | float | bool]
    """Every key whose value is not an array."""
    tensors: dict[str, WrittenTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF's fixed-size value types and their struct formats; 8 is a string, 9 an array."""


def read_gguf_table(path: Path) -> GgufTable:
    """The keys and tensor table of the GGUF file at `path`, read straight from its header.

    gguf's GGUFReader builds a numpy view of every key and token (seconds for a 150,000-token
    vocabulary); this walks the header once, skipping arrays, and checks that every tensor's data lies
    within the file. A file that is not a whole GGUF raises ValueError naming what is wrong.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = 0

        def take(format: str) -> Any:
            nonlocal position
            value = struct.unpack_from(format, data, position)[0]
            position += struct.calcsize(format)
            return value

        def text() -> str:
            nonlocal position
            length = take("<Q")
            if position + length > len(data):
                raise ValueError("a string runs past the end of the file")
            position += length
            return bytes(data[position - length : position]).decode("utf-8", errors="replace")

        def skip_array() -> None:
            nonlocal position
            kind, count = take("<I"), take("<Q")
            if kind in _SCALARS:
                position += count * struct.calcsize(_SCALARS[kind])
            elif kind == 8:
                for _ in range(count):
                    length = take("<Q")  # before the addition: take moves position itself
                    position += length
            else:  # arrays of arrays
                for _ in range(count):
                    skip_array()

        try:
            if take("<I") != 0x46554747:  # "GGUF"
                raise ValueError("it does not start with GGUF's magic number")
            version, tensor_count, key_count = take("<I"), take("<Q"), take("<Q")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not one llama.cpp reads")
            fields: dict[str, str | int | float | bool] = {}
            for _ in range(key_count):
                key, kind = text(), take("<I")
                if kind == 9:
                    skip_array()
                elif kind == 8:
                    fields[key] = text()
                elif kind in _SCALARS:
                    fields[key] = take(_SCALARS[kind])
                else:
                    raise ValueError(f"key {key} has an unknown value type {kind}")
            entries = []
            for _ in range(tensor_count):
                name, dimensions = text(), take("<I")
                if dimensions > 4:
                    raise ValueError(f"tensor {name} has {dimensions} dimensions")
                shape = tuple(reversed([take("<Q") for _ in range(dimensions)]))
                entries.append((name, take("<I"), shape, take("<Q")))
        except struct.error:
            raise ValueError("its header runs past the end of the file") from None
        alignment = int(fields.get("general.alignment", 32))
        data_start = position + -position % alignment
        tensors = {}
        for name, kind, shape, offset in entries:
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except ValueError:
                raise ValueError(f"tensor {name} has an unknown type {kind}") from None
            nbytes = math.prod(shape) // block * block_bytes
            if data_start + offset + nbytes > len(data):
                raise ValueError(f"tensor {name}'s data runs past the end of the file")
            tensors[name] = WrittenTensor(kind, shape, nbytes)
        return GgufTable(fields, tensors)


def gguf_problems(path: Path, gplan: GgufPlan) -> list[str]:
    """Re-read the written file's tensor table: every tensor of the plan, with its type, shape and size, and no other."""
    try:
        written = dict(read_gguf_table(path).tensors)
    except (OSError, ValueError) as error:
        return [f"{path.name} cannot be read back as GGUF ({error})"]
    problems = []
    for tensor in gplan.tensors:
        found = written.pop(tensor.name, None)
        if found is None:
            problems.append(f"{tensor.name} is missing")
        elif found.tensor_type != tensor.tensor_type or found.shape != tensor.shape or found.nbytes != tensor.nbytes:
            problems.append(f"{tensor.name} is not the {tensor.tensor_type.name} {list(tensor.shape)} tensor planned")
    problems += [f"{name} was not planned" for name in written]
    return problems


def gguf_card_section(gplan: GgufPlan) -> str:
    """The model card's section on the GGUF file: its type, what stays float32, fallbacks, how to run it."""
    name = gplan.file_name
    fallbacks = gplan.fallbacks
    lines = [
        "## GGUF",
        "",
        f"`{name}` is a {gplan.type.tensor_type.name} GGUF ({gplan.type.description}) for llama.cpp's "
        f"`{gplan.architecture.name}` architecture, written directly by frankenmoe. Norms, biases, routers and "
        "shared-expert gates are float32.",
    ]
    if fallbacks:
        lines.append(
            f"{len(fallbacks)} tensor(s) whose rows do not divide into {gplan.type.tensor_type.name} blocks are "
            f"{FALLBACK_TYPE.name}: {', '.join(tensor.name for tensor in fallbacks[:8])}"
            + (" ..." if len(fallbacks) > 8 else "")
            + "."
        )
    lines += [
        "The routing check of a safetensors merge does not run for a GGUF output.",
        "",
        "```",
        f"llama-cli -m {name} -p 'Hello'",
        f"echo 'FROM ./{name}' > Modelfile && ollama create my-moe -f Modelfile",
        "```",
        "",
    ]
    return "\n".join(lines)


def describe_gguf_tensor(tensor: GgufTensor) -> str:
    """One dry-run line: the GGUF tensor's name, shape, type and, for a fallback, why."""
    line = f"{tensor.name:<40} {list(tensor.shape)!s:<22} {tensor.tensor_type.name}"
    if tensor.fallback:
        line += " (fallback: rows do not divide into the type's blocks)"
    return line


OUTPUT_FORMATS = ("safetensors", "gguf")
DEFAULT_GGUF_TYPE = "q8_0"


def resolve_gguf_type(output_format: str, type_name: str | None) -> str | None:
    """The GGUF type a merge writes (None: safetensors), from `--format` and `--gguf-type`; refuses a bad pair."""
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {output_format!r} is not valid; choose one of: {', '.join(OUTPUT_FORMATS)}.")
    if output_format == "safetensors":
        if type_name is not None:
            raise ConfigError(f"--gguf-type {type_name} applies to GGUF output only; add --format gguf.")
        return None
    return gguf_type(type_name or DEFAULT_GGUF_TYPE).name


def gguf_folder_problems(folder: Path) -> tuple[list[str], int] | None:
    """`verify`'s tensor check of a GGUF output: the file's tensors are exactly those its config.json implies
    (names, shapes), for llama.cpp's architecture; None when `folder` holds no GGUF file."""
    from gguf import get_tensor_name_map

    from frankenmoe.architectures import OUTPUT_ARCHITECTURES
    from frankenmoe.output import GGUF_FILE_NAME
    from frankenmoe.verification import expected_tensors

    files = sorted(
        path
        for path in folder.iterdir()
        if GGUF_FILE_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink()
    )
    if not files:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        output = OUTPUT_ARCHITECTURES[str(config.get("model_type"))]
        architecture = GGUF_ARCHITECTURES[output.model_type]
    except (OSError, ValueError, KeyError) as error:
        return [f"config.json does not describe a frankenmoe GGUF output ({error})"], 0
    layout = output.layouts[output.default_layout]
    expected_hf = expected_tensors(output, layout, config)
    names = get_tensor_name_map(architecture.arch, int(config["num_hidden_layers"]))
    experts = int(config[output.expert_count_key])
    expected: dict[str, tuple[int, ...]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for part, stack in zip(("gate_proj", "up_proj", "down_proj"), architecture.expert_stack, strict=True):
            template = next(tensor.template for tensor in layout.expert_tensors if tensor.parts == (part,))
            member = template.format(layer=layer, expert=0)
            expected[stack.format(layer=layer)] = (experts, *expected_hf[member])
            for expert in range(experts):
                expected_hf.pop(template.format(layer=layer, expert=expert))
    for name, shape in expected_hf.items():
        expected[str(names.get_name(name, try_suffixes=(".weight", ".bias")))] = shape
    rope = _rope_parameters(config)
    if architecture.permute_qk and rope.get("rope_type") == "llama3":
        expected["rope_freqs.weight"] = (len(llama3_rope_factors(config, rope)),)
    problems: list[str] = []
    count = 0
    for path in files:
        try:
            table = read_gguf_table(path)
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: cannot be read as GGUF ({error})")
            continue
        found = {name: tensor.shape for name, tensor in table.tensors.items()}
        count += len(found)
        if table.fields.get("general.architecture") != architecture.name:
            problems.append(f"{path.name}: general.architecture is not {architecture.name}")
        for name, shape in expected.items():
            if name not in found:
                problems.append(f"{path.name}: {name} missing (config.json implies it)")
            elif found[name] != shape:
                problems.append(f"{path.name}: {name} has shape {list(found[name])}, config.json implies {list(shape)}")
        problems += [
            f"{path.name}: {name} is a tensor config.json does not imply" for name in found if name not in expected
        ]
    return problems, count


def convert_checkpoint(checkpoint: Path, type_name: str, output: Path | None = None) -> FileRecord:
    """Write the GGUF of a frankenmoe safetensors checkpoint (the file `--format gguf` writes for its merge).

    The file goes to `output` (default: CHECKPOINT-<TYPE>.gguf beside the folder, so that the checkpoint's
    manifest still lists all it holds), written under a temporary name and renamed once complete.
    """
    from frankenmoe.architectures import OUTPUT_ARCHITECTURES
    from frankenmoe.layers import detect_layout
    from frankenmoe.output import check_free_space
    from frankenmoe.tensor_io import read_header
    from frankenmoe.write import INDEX_NAME

    entry = gguf_type(type_name)
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        weight_map = json.loads((checkpoint / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(
            f"{checkpoint} is not a frankenmoe safetensors checkpoint (config.json and {INDEX_NAME} are needed: "
            f"{error}). Pass the folder a merge wrote."
        ) from None
    architecture = OUTPUT_ARCHITECTURES.get(str(config.get("model_type")))
    if architecture is None:
        raise ModelError(f"{checkpoint}'s model_type {config.get('model_type')!r} is not a frankenmoe output.")
    locations = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        locations.update(read_header(checkpoint / Path(shard).name))
    jobs = tuple(
        TensorJob(name, location.dtype, location.shape, 0, (TensorPiece(location),))
        for name, location in locations.items()
    )
    layout = detect_layout(architecture, locations)
    target = output or checkpoint.parent / f"{checkpoint.name}-{entry.tensor_type.name}.gguf"
    gplan = gguf_plan_for(jobs, config, architecture, layout, entry.name, checkpoint.name, checkpoint)
    check_free_space(target, gplan.data_bytes)
    partial = target.with_name(f".{target.name}.frankenmoe-partial")

    def no_gates() -> Gates:
        raise AssertionError("a checkpoint's routers are stored tensors")

    try:
        record = write_gguf(gplan, no_gates, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return FileRecord(target.name, record.size, record.sha256)
