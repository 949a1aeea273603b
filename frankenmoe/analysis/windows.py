"""A domain's held-out text as token windows, the same for every model `frankenmoe eval` scores.

A domain's documents are tokenised with the checkpoint's tokenizer (no special tokens),
joined with the end-of-text token after each document, and cut into windows of `window` tokens,
one starting every `stride` tokens; the tail that does not fill a window is dropped, so every
model sees the same tokens. The first window scores every next-token prediction in it (window - 1);
each later window scores only the predictions of its last `stride` tokens (all but its first token
when stride == window), so with overlapping windows every token is scored once, with at least
window - stride tokens of context. The top-1 share counts the same new tokens, at every layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.routers.prompts import load_tokenizer

DomainText = Union[str, Path, Sequence[str], torch.Tensor]  # noqa: UP007 (a runtime alias: Python 3.10 has no `type`)
"""A domain's text: a Path (a .txt file, a folder of .txt files, or a .jsonl file with a `text` field),
a str (the text itself), a sequence of str (documents), or a [windows, length] tensor of token ids
(ready windows, each scored whole: what the quality benchmark passes)."""


@dataclass(frozen=True)
class TokenWindows:
    """One domain's token windows: ids [windows, length], and in each window the first new position
    (0 for the first window; length - stride for the overlapping ones after it)."""

    ids: torch.Tensor
    new_from: tuple[int, ...]

    @property
    def scored(self) -> int:
        """Next-token predictions scored: each window's new tokens, less position 0 (which nothing predicts)."""
        return sum(self.ids.shape[1] - max(1, start) for start in self.new_from)

    @classmethod
    def whole(cls, ids: torch.Tensor) -> TokenWindows:
        """Ready windows ([N, length] token ids), each scored whole."""
        return cls(ids.long(), (0,) * len(ids))


def cut_windows(token_ids: Sequence[int], window: int, stride: int) -> TokenWindows:
    """A token stream cut into full windows of `window` tokens starting every `stride` tokens."""
    starts = range(0, len(token_ids) - window + 1, stride)
    ids = torch.tensor([list(token_ids[start : start + window]) for start in starts], dtype=torch.long)
    return TokenWindows(
        ids.reshape(len(starts), window), tuple(0 if start == 0 else window - stride for start in starts)
    )


def read_documents(path: Path, name: str) -> list[str]:
    """The documents of `--text NAME=PATH`: a text file (one document), a folder of .txt files (one each,
    in name order), or a .jsonl file (each line's `text` field)."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ConfigError(
                f"Text {name!r}: the folder {path} holds no .txt files. Put the domain's text in *.txt files."
            )
        return [_read_text(file, name) for file in files]
    if not path.is_file():
        raise ConfigError(
            f"Text {name!r}: {path} does not exist. Pass --text NAME=FILE with a text file, a folder of .txt files "
            "or a .jsonl file with a `text` field."
        )
    if path.suffix != ".jsonl":
        return [_read_text(path, name)]
    documents = []
    for number, line in enumerate(_read_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"Text {name!r}: line {number} of {path} is not JSON ({error}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"Text {name!r}: line {number} of {path} has no string `text` field.")
        documents.append(record["text"])
    return documents


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Text {name!r}: {path} cannot be read as UTF-8 text ({error}).") from None


def domain_windows(folder: Path, name: str, text: DomainText, window: int, stride: int) -> TokenWindows:
    """`text` as token windows, tokenised with the tokenizer in `folder`; a ConfigError when there is
    no text or too little for one window."""
    if isinstance(text, torch.Tensor):
        if text.dim() != 2 or text.shape[1] < 2 or not len(text):
            raise ConfigError(f"Text {name!r}: token windows must be a [windows, length >= 2] tensor.")
        return TokenWindows.whole(text)
    documents = (
        read_documents(text, name) if isinstance(text, Path) else [text] if isinstance(text, str) else list(text)
    )
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise ConfigError(f"Text {name!r} is empty. Give it held-out text of the domain (at least {window} tokens).")
    tokenizer = load_tokenizer(folder)
    separator = tokenizer.eos_token_id
    if separator is None:
        raise ModelError(f"The tokenizer in {folder} has no end-of-text token to separate documents with.")
    ids: list[int] = []
    for document in documents:
        ids += [*tokenizer(document, add_special_tokens=False)["input_ids"], separator]
    if len(ids) < window:
        raise ConfigError(
            f"Text {name!r} is {len(ids)} tokens long, shorter than one window of {window}. Give it more text, "
            f"or a smaller --window (every model is scored on the same full windows)."
        )
    return cut_windows(ids, window, stride)
