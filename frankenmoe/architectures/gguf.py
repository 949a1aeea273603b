"""What llama.cpp calls things: GGUF types, architectures, tensor kinds and tokenizer names, as data.

Facts here were read from llama.cpp's `convert_hf_to_gguf.py` (the llama-cpp-python 0.3.36 sdist), so
that a GGUF frankenmoe writes directly is the file that converter writes from the same merge's
safetensors output: which output architecture becomes which llama.cpp architecture, which tensors
llama.cpp keeps in float32, how Llama's query/key rows are permuted, which metadata each architecture
carries and how a BPE tokenizer's pre-tokenizer is recognised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, LlamaFileType

from frankenmoe.architectures.roles import MLP_PARTS


@dataclass(frozen=True)
class GgufType:
    """A `--gguf-type`: the tensor type of every quantisable tensor, and the file type it records."""

    name: str
    tensor_type: GGMLQuantizationType
    file_type: LlamaFileType
    description: str


GGUF_TYPES: dict[str, GgufType] = {
    entry.name: entry
    for entry in (
        GgufType("bf16", GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, "bfloat16, lossless from bf16 sources"),
        GgufType("f16", GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, "float16"),
        GgufType("f32", GGMLQuantizationType.F32, LlamaFileType.ALL_F32, "float32, lossless"),
        GgufType(
            "q8_0", GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, "8-bit blocks of 32 (about 8.5 bits/weight)"
        ),
        GgufType("q4_0", GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, "legacy 4-bit, blocks of 32"),
        GgufType(
            "q4_1", GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1, "legacy 4-bit with offset, blocks of 32"
        ),
        GgufType("q5_0", GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0, "legacy 5-bit, blocks of 32"),
        GgufType(
            "q5_1", GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1, "legacy 5-bit with offset, blocks of 32"
        ),
    )
}
FALLBACK_TYPE = GGMLQuantizationType.F16
"""What a tensor whose rows do not divide into the type's blocks is written as (llama.cpp's converter does the same)."""
F32_TENSOR_KINDS = ("ffn_gate_inp", "ffn_gate_inp_shexp")
"""Routers and the shared expert's gate stay float32 at every type (so do norms, biases and 1-D tensors)."""

SENTENCEPIECE = "sentencepiece"
"""tokenizer.model read with sentencepiece: tokenizer model "llama", pre-tokenizer "default"."""
LLAMA_HF = "llama_hf"
"""A SentencePiece-style (byte-fallback) tokenizer.json without tokenizer.model, read with gguf.LlamaHfVocab."""
BPE = "bpe"
"""A byte-level BPE tokenizer.json: tokenizer model "gpt2", its pre-tokenizer recognised by PRE_TOKENIZER_HASHES."""


@dataclass(frozen=True)
class GgufArchitecture:
    """How one frankenmoe output architecture is written as GGUF."""

    arch: MODEL_ARCH
    permute_qk: bool
    """llama.cpp's llama architecture expects q_proj/k_proj rows interleaved per head (its rope's pairing)."""
    tokenizers: tuple[str, ...]
    """Tokenizer kinds tried in order (the first whose files are present is used)."""
    writes_vocab_size: bool
    """`llama.vocab_size` and `llama.rope.dimension_count` (llama only)."""
    expert_length_keys: tuple[str, ...] = ()
    """config.json keys written as expert_feed_forward_length, expert_shared_feed_forward_length (Qwen MoEs)."""
    expert_stack: tuple[str, ...] = tuple(
        f"blk.{{layer}}.ffn_{part.removesuffix('_proj')}_exps.weight" for part in MLP_PARTS
    )
    """Every routed expert's gate/up/down of a layer, stacked into one 3-D tensor each (in MLP_PARTS order)."""

    @property
    def name(self) -> str:
        from gguf import MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[self.arch]


GGUF_ARCHITECTURES: dict[str, GgufArchitecture] = {
    # llama.cpp runs Mixtral as its llama architecture with experts.
    "mixtral": GgufArchitecture(MODEL_ARCH.LLAMA, True, (SENTENCEPIECE, LLAMA_HF, BPE), writes_vocab_size=True),
    "qwen2_moe": GgufArchitecture(
        MODEL_ARCH.QWEN2MOE,
        False,
        (BPE,),
        writes_vocab_size=False,
        expert_length_keys=("moe_intermediate_size", "shared_expert_intermediate_size"),
    ),
    "qwen3_moe": GgufArchitecture(
        MODEL_ARCH.QWEN3MOE,
        False,
        (BPE,),
        writes_vocab_size=False,
        expert_length_keys=("moe_intermediate_size", "shared_expert_intermediate_size"),
    ),
}

PRE_TOKENIZER_TEXT = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
"""llama.cpp identifies a BPE pre-tokenizer by the sha256 of str(tokenizer.encode(this text))."""
PRE_TOKENIZER_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1 / 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo and later
}
"""The pre-tokenizers of the families frankenmoe reads, as llama.cpp's converter names them. A BPE tokenizer
whose hash is not here is refused (llama.cpp would tokenize it wrongly under a guessed name)."""


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
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
