"""Where tokens go in a MoE checkpoint: per-token router probabilities, layer by layer.

Works on a checkpoint of any output architecture in the tables (ours, or one made by another tool); the
model is streamed one decoder layer at a time, so memory stays at one layer plus activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from frankenmoe.checkpoint.folder import Checkpoint
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.decoder.moe import router_probabilities
from frankenmoe.routers.prompts import EncodedPrompt, encode_prompts, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptRouting:
    """One prompt's routing: router probabilities for every layer and token."""

    prompt: EncodedPrompt
    tokens: tuple[str, ...]
    """The tokenizer's own pieces (`Ġdivided`, `▁the`, `<0x0A>`), as `--json` reports them."""
    probabilities: torch.Tensor
    """[layers, tokens, experts], the softmax of the router logits in float32."""
    texts: tuple[str, ...] = ()
    """The text each token stands for (`token_texts`): what the text output and the heatmap show."""


def route_prompts(
    checkpoint: Checkpoint,
    texts: Sequence[str],
    device: torch.device | None = None,
    layers: Iterable[int] | None = None,
    in_memory: Mapping[str, torch.Tensor] | None = None,
) -> list[PromptRouting]:
    """Run each prompt through the checkpoint, one layer at a time, recording router probabilities.

    `in_memory` gives routers (or shared-expert gates) as values instead of reading them (see
    StreamedDecoder.in_memory).
    """
    prompts = encode_prompts(checkpoint.path, checkpoint.config, texts)
    tokenizer = load_tokenizer(checkpoint.path)
    decoder = StreamedDecoder(checkpoint.config, checkpoint.tensors, device or torch.device("cpu"), in_memory or {})
    hidden = [decoder.embed(prompt.token_ids) for prompt in prompts]
    per_layer: list[list[torch.Tensor]] = []
    chosen = list(layers) if layers is not None else list(range(checkpoint.num_layers))
    for position, layer in enumerate(chosen):
        if position + 1 < len(chosen):
            layer_pass = decoder.forward_layer(layer, hidden)
            hidden, logits = layer_pass.hidden, layer_pass.router_logits
        else:  # the last layer's MLP output would feed no router: its attention and router are enough
            router_inputs = [output.router_input for output in decoder.attend(layer, hidden)]
            with torch.no_grad():
                routed = decoder.router_logits(layer, torch.cat(router_inputs))
            logits = None if routed is None else list(routed.split([len(inputs) for inputs in router_inputs]))
        per_layer.append([router_probabilities(layer_logits).cpu() for layer_logits in logits or []])
    return [
        PromptRouting(
            prompt=prompt,
            tokens=tuple(tokenizer.convert_ids_to_tokens(prompt.token_ids.tolist())),
            probabilities=torch.stack([layer_probabilities[index] for layer_probabilities in per_layer]),
            texts=token_texts(tokenizer, prompt.token_ids.tolist()),
        )
        for index, prompt in enumerate(prompts)
    ]


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> tuple[str, ...]:
    """The text each token stands for, as the tokenizer decodes it in context.

    Decoding a token alone loses what its neighbours give it (a SentencePiece `▁the` decodes to
    "the" at the start of a text but to " the" after another token), so each group of tokens is
    decoded after the group before it, and its text is what that adds. A group is one token, or the
    few tokens that only together make whole characters (the bytes of one emoji, say): the group's
    text goes to its first token and the others get "" (`display_token` shows them as a continuation).
    """
    texts: list[str] = []
    anchor: list[int] = []  # the previous group: whole characters, the context the next group is decoded in
    start = 0
    for end in range(1, len(ids) + 1):
        group = list(ids[start:end])
        decoded = _decode(tokenizer, anchor + group)
        if decoded.endswith(INCOMPLETE_CHARACTER) and end < len(ids):
            continue  # this token ends inside a character: the next ones complete it
        before = _decode(tokenizer, anchor)
        text = decoded[len(before) :] if decoded.startswith(before) else _decode(tokenizer, group)
        texts += [text] + [""] * (len(group) - 1)
        anchor, start = group, end
    return tuple(texts)


INCOMPLETE_CHARACTER = "\ufffd"
"""What decoding puts where a token's bytes end inside a UTF-8 character."""


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    if not ids:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


TOKEN_ESCAPES = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
CONTINUATION = "↳"
"""Shown for a token that only completes the character the token before it starts."""


def display_token(text: str) -> str:
    """A token's text for a terminal or a picture: spaces visible as ␣, newlines and other control or
    invisible characters escaped (`\\n`, `\\x00`), so every token keeps to one visible cell.

        >>> display_token(" divided"), display_token("\\n"), display_token("")
        ('␣divided', '\\\\n', '↳')
    """
    if not text:
        return CONTINUATION
    return "".join(
        TOKEN_ESCAPES.get(character, character if character.isprintable() else repr(character)[1:-1])
        for character in text
    )
