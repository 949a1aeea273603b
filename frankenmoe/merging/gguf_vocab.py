"""A tokenizer as GGUF stores it: SentencePiece or BPE vocabularies, token types, merges and the pre-tokenizer name."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures.gguf import (
    BPE,
    LLAMA_HF,
    PRE_TOKENIZER_HASHES,
    PRE_TOKENIZER_TEXT,
    SENTENCEPIECE,
    GgufArchitecture,
)
from frankenmoe.errors import ModelError


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
