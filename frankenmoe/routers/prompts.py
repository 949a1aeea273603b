"""Prompts to token ids, token states to one vector per prompt, prompt vectors to gate rows."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from frankenmoe.architectures.tables import TOKENIZER_FILES
from frankenmoe.config.schema import ExpertConfig, RouterConfig
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.decoder.generate import greedy_continuations
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.sources.model import SourceModel

logger = logging.getLogger("frankenmoe")

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""Files of which at least one must exist for a tokenizer to load (the rest only configure it)."""
LEAD_IN_TEXT = "\n"
"""What `router.lead_in` puts before a prompt: a newline reads as a line break in any tokenizer and
carries no topic of its own."""


@dataclass(frozen=True)
class EncodedPrompt:
    text: str
    token_ids: torch.Tensor
    content_mask: torch.Tensor
    """True for the prompt's own tokens, False for special tokens such as BOS and for a lead-in."""


@dataclass(frozen=True)
class ExpertPrompts:
    """All prompts of all experts in one flat list, with each expert's positive/negative indices."""

    prompts: tuple[EncodedPrompt, ...]
    positive: tuple[tuple[int, ...], ...]
    negative: tuple[tuple[int, ...], ...]


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in `folder`, loaded once per process for as long as its files are unchanged."""
    stamp = tuple((name, (folder / name).stat().st_mtime_ns) for name in TOKENIZER_FILES if (folder / name).is_file())
    return _load_tokenizer(folder.resolve(), stamp)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: Path, stamp: tuple[tuple[str, int], ...]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    del stamp  # part of the cache key only: a rewritten tokenizer file must not be served stale
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many unrelated types for a missing or broken tokenizer
        if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
            # transformers then blames a missing sentencepiece or tiktoken, which would not help.
            raise ModelError(
                f"The model folder {folder} has no tokenizer files: none of {', '.join(TOKENIZER_MARKERS[:-1])} "
                f"or {TOKENIZER_MARKERS[-1]} is there. Copy the tokenizer files of the model it was made from into "
                "it (a merged checkpoint takes them from its base model folder)."
            ) from None
        raise ModelError(
            f"The model folder {folder} has no usable tokenizer ({type(error).__name__}: {error}). "
            "It needs its tokenizer files (tokenizer.json or tokenizer.model)."
        ) from None


def encode_prompts(
    folder: Path, config: dict[str, Any], texts: Sequence[str], lead_in: bool = False
) -> list[EncodedPrompt]:
    """Tokenise prompts as the model in `folder` sees them; prompts past the context window are truncated.

    With `lead_in`, a prompt whose tokenizer puts no special token first gets LEAD_IN_TEXT's tokens in
    front, marked as not content. Without a start token, a model makes the sequence's first position
    its attention sink, whose states are unlike any later position's; a one-word keyword prompt would
    be nothing but that position, and rows built from it say little about the tokens they route.
    """
    check_not_empty(texts)
    tokenizer = load_tokenizer(folder)
    limit = int(config.get("max_position_embeddings") or 0)
    lead_ids = list(tokenizer(LEAD_IN_TEXT, add_special_tokens=False)["input_ids"]) if lead_in else []
    special_ids = frozenset(tokenizer.all_special_ids)
    encoded: list[EncodedPrompt] = []
    for text in texts:
        result = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
        ids = list(result["input_ids"])
        special = list(result["special_tokens_mask"])
        if special_ids.issuperset(ids):
            _warn_special_only(text, tokenizer.convert_ids_to_tokens(ids))
        if lead_ids and ids and not special[0]:
            ids, special = lead_ids + ids, [1] * len(lead_ids) + special
        if limit and len(ids) > limit:
            _warn_once(
                ("truncated", text, limit),
                "Prompt %r is %d tokens long, more than the model's context of %d; it was truncated to the first %d tokens.",
                _short(text),
                len(ids),
                limit,
                limit,
            )
            ids, special = ids[:limit], special[:limit]
        content = torch.tensor([not flag for flag in special], dtype=torch.bool)
        if not content.any():
            content = torch.ones(len(ids), dtype=torch.bool)
        encoded.append(EncodedPrompt(text, torch.tensor(ids, dtype=torch.long), content))
    return encoded


def check_not_empty(texts: Sequence[str]) -> None:
    """Refuse empty and whitespace-only prompts: tokenised, they are nothing but the start token."""
    for index, text in enumerate(texts):
        if not text.strip():
            raise ConfigError(
                f"Prompt {index + 1} of {len(texts)} is empty{' (only whitespace)' if text else ''}: it would be "
                "nothing but the start token, so its routing says nothing. Remove it or write some text."
            )


def _warn_special_only(text: str, tokens: Sequence[str]) -> None:
    _warn_once(
        ("special only", text),
        "Prompt %r is made only of special tokens (%s): it has no text of its own, so its routing says nothing "
        "about any text, and experts given such prompts get near-identical router rows (a rank-deficient router). "
        "Write the prompt as plain text.",
        _short(text),
        ", ".join(dict.fromkeys(tokens)),
    )


_WARNED: set[tuple[object, ...]] = set()
_WARNED_LIMIT = 4096


def _warn_once(key: tuple[object, ...], message: str, *args: object) -> None:
    """Log a warning about a prompt the first time this process meets `key`.

    A merge tokenises its prompts for the routers and again for the routing check, and one prompt can
    serve several experts; the user needs to read about each prompt once.
    """
    if key in _WARNED:
        return
    if len(_WARNED) >= _WARNED_LIMIT:  # a long-running process routing many prompts must not grow without end
        _WARNED.clear()
    _WARNED.add(key)
    logger.warning(message, *args)


def _short(text: str) -> str:
    return text[:40] + ("..." if len(text) > 40 else "")


def collect_expert_prompts(model: SourceModel, experts: Sequence[ExpertConfig], lead_in: bool = False) -> ExpertPrompts:
    texts: list[str] = []
    positive: list[tuple[int, ...]] = []
    negative: list[tuple[int, ...]] = []
    for expert in experts:
        positive.append(tuple(range(len(texts), len(texts) + len(expert.positive_prompts))))
        texts.extend(expert.positive_prompts)
        negative.append(tuple(range(len(texts), len(texts) + len(expert.negative_prompts))))
        texts.extend(expert.negative_prompts)
    encoded = encode_prompts(model.path, model.config, texts, lead_in)
    return ExpertPrompts(tuple(encoded), tuple(positive), tuple(negative))


def with_continuations(
    prompts: ExpertPrompts, model: SourceModel, decoder: StreamedDecoder, max_new_tokens: int, show_progress: bool
) -> ExpertPrompts:
    """Every prompt followed by up to `max_new_tokens` tokens the model writes after it (greedy), as content.

    A keyword prompt says little about the text an expert will see: its one or two tokens sit where
    in-sentence tokens never do. What the model itself writes after "python" or "storywriting" is
    text of that topic, so rows built from it describe the tokens they will route.
    """
    tokenizer = load_tokenizer(model.path)
    with tqdm(
        total=max_new_tokens, desc="continuing prompts", unit="token", disable=not show_progress, leave=False
    ) as bar:
        continuations = greedy_continuations(
            decoder,
            [prompt.token_ids for prompt in prompts.prompts],
            max_new_tokens,
            stop_tokens(model.config, tokenizer),
            on_step=bar.update,
        )
    continued = []
    for prompt, continuation in zip(prompts.prompts, continuations, strict=True):
        logger.info("Router prompt %r continued by the base model: %r", prompt.text, tokenizer.decode(continuation))
        continued.append(
            EncodedPrompt(
                prompt.text,
                torch.cat([prompt.token_ids, continuation]),
                torch.cat([prompt.content_mask, torch.ones(len(continuation), dtype=torch.bool)]),
            )
        )
    return ExpertPrompts(tuple(continued), prompts.positive, prompts.negative)


def stop_tokens(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Token ids that end a model's text: config.json's eos_token_id (one or a list) and the tokenizer's."""
    configured = config.get("eos_token_id")
    ids = configured if isinstance(configured, list) else [configured]
    return frozenset(int(token) for token in (*ids, tokenizer.eos_token_id) if isinstance(token, int))


def pool(states: torch.Tensor, prompt: EncodedPrompt, pooling: str) -> torch.Tensor:
    """One float32 vector for a prompt from its per-token states [T, hidden]."""
    content = states[prompt.content_mask.to(states.device)].float()
    if pooling == "last":
        return content[-1]
    return content.mean(dim=0)


def rows_from_prompt_vectors(
    vectors: Sequence[torch.Tensor], prompts: ExpertPrompts, common: torch.Tensor | None = None
) -> torch.Tensor:
    """Each expert's row: mean of its positive prompt vectors minus mean of its negatives, unit norm.

    With `common` (a direction every token shares, such as the mean prompt token), each row loses its
    component along it before normalising (see `without_component`).
    """
    rows = []
    for positive, negative in zip(prompts.positive, prompts.negative, strict=True):
        row = torch.stack([vectors[index] for index in positive]).mean(dim=0)
        if negative:
            row = row - torch.stack([vectors[index] for index in negative]).mean(dim=0)
        rows.append(row)
    stacked = torch.stack(rows)
    if common is not None:
        stacked = without_component(stacked, common)
    return (stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()


def without_component(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`rows` [experts, hidden] minus their projections on `direction`.

    Router inputs share a large common component (the mean token, massive activations); a row that
    is not orthogonal to it gives its expert an advantage, or a handicap, on every token alike.
    """
    unit = direction.to(rows) / direction.norm().clamp_min(1e-12)
    return rows - (rows @ unit).unsqueeze(-1) * unit


def content_tokens(states: Sequence[torch.Tensor], prompts: ExpertPrompts) -> torch.Tensor:
    """[tokens, hidden] float32: every prompt's own (non-special) token states, in prompt order."""
    return torch.cat(
        [
            state[prompt.content_mask.to(state.device)].float().cpu()
            for state, prompt in zip(states, prompts.prompts, strict=True)
        ]
    )


def row_scale(rows: torch.Tensor, router_inputs: torch.Tensor, router: RouterConfig) -> float:
    """`router.scale`, or with scale auto (None) the factor that makes the router logits of
    `router_inputs` ([tokens, hidden]: the prompts' tokens at this layer) have a mean standard
    deviation across experts of `router.logit_std`.

    Why auto: rows built from hidden states differ from each other by a small fraction of the
    activation norm, so unit-norm rows give near-uniform routing, and a fixed number cannot suit
    every layer and model. Calibrating the logit spread on the prompts themselves sets how decisive
    the router is in one unit that means the same everywhere.
    """
    if router.scale is not None:
        return router.scale
    spread = float((router_inputs.float() @ rows.float().T).std(dim=-1, unbiased=False).mean())
    if spread < 1e-12 or len(rows) < 2:
        return 1.0
    return router.logit_std / spread
