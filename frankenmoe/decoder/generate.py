"""Greedy text generation on the streamed decoder: what the model writes after each prompt."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from frankenmoe.decoder.attention import KeyValueCache
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.runtime.memory import reuse_large_buffers


def greedy_continuations(
    decoder: StreamedDecoder,
    sequences: Sequence[torch.Tensor],
    max_new_tokens: int,
    stop_tokens: Collection[int],
    on_step: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    """What the model writes after each sequence, greedily: up to `max_new_tokens` token ids each.

    A continuation ends before its first stop token, and where the model's context would overflow.
    Every step streams the whole decoder once for all unfinished sequences together; each sequence's
    keys and values are cached, so a step costs one token per sequence.
    """
    limit = int(decoder.config.get("max_position_embeddings") or 0)
    budgets = [max(0, min(max_new_tokens, limit - len(tokens))) if limit else max_new_tokens for tokens in sequences]
    written: list[list[int]] = [[] for _ in sequences]
    caches = [KeyValueCache() for _ in sequences]
    feeding = {index: tokens for index, tokens in enumerate(sequences) if budgets[index] > 0}
    with reuse_large_buffers():
        for _ in range(max(budgets, default=0)):
            if not feeding:
                break
            active = list(feeding)
            next_tokens = _greedy_step(
                decoder, [feeding[index] for index in active], [caches[index] for index in active]
            )
            feeding = {}
            for index, token in zip(active, next_tokens, strict=True):
                if token in stop_tokens:
                    continue
                written[index].append(token)
                if len(written[index]) < budgets[index]:
                    feeding[index] = torch.tensor([token], dtype=torch.long)
            if on_step is not None:
                on_step()
    return [torch.tensor(tokens, dtype=torch.long) for tokens in written]


def _greedy_step(decoder: StreamedDecoder, new_tokens: list[torch.Tensor], caches: list[KeyValueCache]) -> list[int]:
    """Run each sequence's new tokens through every layer behind its cache; the next token of each."""
    hidden = [decoder.embed(tokens) for tokens in new_tokens]
    for layer in range(decoder.num_layers):
        hidden = decoder.forward_layer(layer, hidden, caches).hidden
    with torch.no_grad():
        return decoder.greedy_tokens(torch.cat([state[0, -1:] for state in hidden])).tolist()
