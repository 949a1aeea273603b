"""Where tokens go in a MoE checkpoint: per-token router probabilities, layer by layer.

Works on a checkpoint of any output architecture in the tables (ours, or one made by another tool); the
model is streamed one decoder layer at a time, so memory stays at one layer plus activations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from frankenmoe.checkpoint.folder import Checkpoint, load_checkpoint
from frankenmoe.config.schema import ExpertConfig
from frankenmoe.decoder.layers import StreamedDecoder
from frankenmoe.errors import ConfigError
from frankenmoe.routers.prompts import TOKENIZER_MARKERS, EncodedPrompt, encode_prompts, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


logger = logging.getLogger("frankenmoe")


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
        per_layer.append([torch.softmax(layer_logits.float(), dim=-1).cpu() for layer_logits in logits or []])
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


@dataclass(frozen=True)
class RoutingSummary:
    """Routing statistics over a set of prompts, counted on content tokens (special tokens excluded)."""

    utilisation: torch.Tensor
    """[layers, experts]: the share of tokens whose top-1 expert is each expert."""
    mean_entropy: float
    """Mean over layers and tokens of the router distribution's entropy, in nats (max ln(experts))."""

    @property
    def overall_utilisation(self) -> torch.Tensor:
        return self.utilisation.mean(dim=0)


@dataclass(frozen=True)
class RoutingAccuracy:
    """How often labelled prompts reach their expert (see `routing_accuracy` for the definitions)."""

    prompt_accuracy: float
    token_accuracy_by_layer: tuple[float, ...]
    prompt_accuracy_by_expert: dict[int, float]
    token_accuracy_by_expert: dict[int, float]

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_accuracy_by_layer) / len(self.token_accuracy_by_layer)


def content_probabilities(routing: PromptRouting) -> torch.Tensor:
    """[layers, content tokens, experts]: the probabilities of the prompt's own tokens only."""
    return routing.probabilities[:, routing.prompt.content_mask]


def summarise_routing(routings: Sequence[PromptRouting]) -> RoutingSummary:
    probabilities = torch.cat([content_probabilities(routing) for routing in routings], dim=1)
    experts = probabilities.shape[-1]
    top = probabilities.argmax(dim=-1)
    counts = torch.stack([torch.bincount(layer_top, minlength=experts) for layer_top in top]).float()
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)
    return RoutingSummary(counts / counts.sum(dim=-1, keepdim=True), float(entropy.mean()))


def preferred_expert(routing: PromptRouting) -> int:
    """The expert with the largest router probability summed over all layers and content tokens."""
    return int(content_probabilities(routing).sum(dim=(0, 1)).argmax())


def routing_accuracy(routings: Sequence[PromptRouting], labels: Sequence[int]) -> RoutingAccuracy:
    """Prompt level: is `preferred_expert` the label. Token level: per layer, the share of content
    tokens whose top-1 expert is the label (pooled over all prompts)."""
    if len(routings) != len(labels) or not routings:
        raise ValueError("routing_accuracy needs one label per routed prompt, and at least one prompt")
    prompt_hits = [preferred_expert(routing) == label for routing, label in zip(routings, labels, strict=True)]
    token_hits = [
        content_probabilities(routing).argmax(dim=-1) == label for routing, label in zip(routings, labels, strict=True)
    ]
    all_hits = torch.cat(token_hits, dim=1).float()
    by_expert_prompt: dict[int, float] = {}
    by_expert_token: dict[int, float] = {}
    for expert in sorted(set(labels)):
        chosen = [index for index, label in enumerate(labels) if label == expert]
        by_expert_prompt[expert] = sum(prompt_hits[index] for index in chosen) / len(chosen)
        by_expert_token[expert] = float(torch.cat([token_hits[index] for index in chosen], dim=1).float().mean())
    return RoutingAccuracy(
        prompt_accuracy=sum(prompt_hits) / len(prompt_hits),
        token_accuracy_by_layer=tuple(float(value) for value in all_hits.mean(dim=1)),
        prompt_accuracy_by_expert=by_expert_prompt,
        token_accuracy_by_expert=by_expert_token,
    )


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"Prompts file {path} cannot be read ({error}). Pass a UTF-8 text file, one prompt a line."
        ) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"Prompts file {path} holds no prompts. Write one prompt per line.")
    return prompts


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    expert: int


def load_labels(path: Path, expert_count: int, expert_sources: Sequence[str] = ()) -> list[LabelledPrompt]:
    """Read a YAML mapping of expert (index or name) -> prompts that should route to it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Labels file {path} cannot be read ({error}).") from None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"Labels file {path} is not valid YAML ({str(error).splitlines()[0]}). It must map each expert "
            "(an index such as 0, or a source_model name) to a list of prompts."
        ) from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"Labels file {path} must be a non-empty YAML mapping of expert (index or source_model name) to a list "
            'of prompts, e.g.\n0:\n  - "Write a Python function"\n1:\n  - "Once upon a time"'
        )
    labelled: list[LabelledPrompt] = []
    for key, prompts in data.items():
        expert = resolve_expert(key, expert_count, expert_sources, str(path))
        texts = [prompts] if isinstance(prompts, str) else prompts
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text.strip() for text in texts)
        ):
            raise ConfigError(
                f"Labels file {path}: the value of {key!r} must be a prompt or a list of non-empty prompts."
            )
        labelled.extend(LabelledPrompt(text, expert) for text in texts)
    return labelled


def resolve_expert(key: object, expert_count: int, expert_sources: Sequence[str], where: str) -> int:
    """An expert index from an integer, or from a name matching one expert's source_model.

    A name matches a source_model when it is the whole reference or its last path component
    (`code-expert` matches `./models/code-expert` and `org/code-expert@main`).
    """
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < expert_count:
            raise ConfigError(
                f"{where}: expert {key} does not exist; the checkpoint has experts 0 to {expert_count - 1}."
            )
        return key
    name = str(key)
    matches = [index for index, source in enumerate(expert_sources) if name in (source, _short_name(source))]
    if len(matches) == 1:
        return matches[0]
    if not expert_sources:
        raise ConfigError(
            f"{where}: expert {name!r} is a name, but this checkpoint has no frankenmoe model card with a merge "
            f"recipe to match names against. Use expert indices 0 to {expert_count - 1} instead."
        )
    known = ", ".join(f"{index} = {source}" for index, source in enumerate(expert_sources))
    problem = "matches several experts" if matches else "matches no expert"
    raise ConfigError(f"{where}: expert {name!r} {problem}. Use an index or a source_model name: {known}.")


def _short_name(source: str) -> str:
    return source.split("@")[0].rstrip("/").rsplit("/", 1)[-1]


def expert_names(expert_count: int, expert_sources: Sequence[str] = ()) -> list[str]:
    """Display names: the source_model of each expert where the card names them, else `expert N`."""
    if len(expert_sources) == expert_count:
        return list(expert_sources)
    return [f"expert {index}" for index in range(expert_count)]


def routing_to_dict(routings: Sequence[PromptRouting], summary: RoutingSummary, names: Sequence[str]) -> dict[str, Any]:
    """Per-prompt grids and shares plus the overall summary, as JSON-ready data (content tokens only)."""
    experts = summary.utilisation.shape[-1]
    return {
        "layers": summary.utilisation.shape[0],
        "experts": experts,
        "expert_names": list(names),
        "prompts": [
            {
                "text": routing.prompt.text,
                "tokens": content_tokens(routing),
                "token_texts": _content(routing, routing.texts),
                "top_expert": content_probabilities(routing).argmax(dim=-1).tolist(),
                "expert_share": summarise_routing([routing]).utilisation.tolist(),
                "preferred_expert": preferred_expert(routing),
            }
            for routing in routings
        ],
        "utilisation": {
            "by_layer": summary.utilisation.tolist(),
            "overall": summary.overall_utilisation.tolist(),
        },
        "mean_entropy": summary.mean_entropy,
        "max_entropy": math.log(experts),
    }


def content_tokens(routing: PromptRouting) -> list[str]:
    """The raw pieces of the prompt's own tokens (special tokens left out)."""
    return _content(routing, routing.tokens)


def content_texts(routing: PromptRouting) -> list[str]:
    """What the prompt's own tokens stand for, as `display_token` shows them."""
    return [display_token(text) for text in _content(routing, routing.texts)]


def _content(routing: PromptRouting, values: Sequence[str]) -> list[str]:
    return [value for value, keep in zip(values, routing.prompt.content_mask.tolist(), strict=True) if keep]


def accuracy_to_dict(
    accuracy: RoutingAccuracy, routings: Sequence[PromptRouting], labels: Sequence[int], names: Sequence[str]
) -> dict[str, Any]:
    return {
        "prompt_accuracy": accuracy.prompt_accuracy,
        "token_accuracy": accuracy.token_accuracy,
        "token_accuracy_by_layer": list(accuracy.token_accuracy_by_layer),
        "by_expert": [
            {
                "expert": expert,
                "name": names[expert],
                "prompt_accuracy": accuracy.prompt_accuracy_by_expert[expert],
                "token_accuracy": accuracy.token_accuracy_by_expert[expert],
            }
            for expert in accuracy.prompt_accuracy_by_expert
        ],
        "prompts": [
            {"text": routing.prompt.text, "label": label, "preferred_expert": preferred_expert(routing)}
            for routing, label in zip(routings, labels, strict=True)
        ],
    }


@dataclass(frozen=True)
class RoutingCheck:
    """Whether each expert's own positive prompts route to it, right after a merge."""

    expert_sources: tuple[str, ...]
    prompts_per_expert: dict[int, int]
    hits_per_expert: dict[int, int]
    accuracy: RoutingAccuracy

    @property
    def hits(self) -> int:
        return sum(self.hits_per_expert.values())

    @property
    def prompts(self) -> int:
        return sum(self.prompts_per_expert.values())


def check_positive_prompts(
    folder: Path, experts: Sequence[ExpertConfig], device: torch.device | None = None
) -> RoutingCheck | None:
    """Route every expert's positive prompts through the checkpoint in `folder`; None when it cannot run
    (`routing_check_skip_reason` says why)."""
    if routing_check_skip_reason(folder, experts) is not None:
        return None
    return check_routing(load_checkpoint(folder), experts, device)


def check_routing(
    checkpoint: Checkpoint,
    experts: Sequence[ExpertConfig],
    device: torch.device | None,
    in_memory: Mapping[str, torch.Tensor] | None = None,
) -> RoutingCheck:
    labelled = [(text, index) for index, expert in enumerate(experts) for text in expert.positive_prompts]
    routings = route_prompts(checkpoint, [text for text, _ in labelled], device, in_memory=in_memory)
    labels = [label for _, label in labelled]
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    for routing, label in zip(routings, labels, strict=True):
        counts[label] = counts.get(label, 0) + 1
        hits[label] = hits.get(label, 0) + (preferred_expert(routing) == label)
    return RoutingCheck(
        expert_sources=tuple(expert.source_model for expert in experts),
        prompts_per_expert=counts,
        hits_per_expert=hits,
        accuracy=routing_accuracy(routings, labels),
    )


def routing_check_skip_reason(folder: Path, experts: Sequence[ExpertConfig]) -> str | None:
    if not any(expert.positive_prompts for expert in experts):
        return "routing check skipped: no expert has positive prompts to route."
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        return "routing check skipped: the checkpoint has no tokenizer (the base model folder has none)."
    return None


def routing_check_lines(check: RoutingCheck) -> list[str]:
    """The check as a few lines for the terminal."""
    accuracy = check.accuracy
    lines = [
        f"routing check: {check.hits}/{check.prompts} positive prompts route to their own expert; "
        f"{accuracy.token_accuracy:.0%} of tokens pick it first (by layer: "
        + ", ".join(f"{value:.0%}" for value in accuracy.token_accuracy_by_layer)
        + ")"
    ]
    for expert, count in check.prompts_per_expert.items():
        lines.append(
            f"  expert {expert} ({check.expert_sources[expert]}): {check.hits_per_expert[expert]}/{count} prompts, "
            f"{accuracy.token_accuracy_by_expert[expert]:.0%} of tokens"
        )
    return lines


def routing_check_markdown(check: RoutingCheck) -> str:
    """The check as a model-card section."""
    accuracy = check.accuracy
    rows = "\n".join(
        f"| {expert} | `{check.expert_sources[expert]}` | {check.hits_per_expert[expert]}/{count} | "
        f"{accuracy.token_accuracy_by_expert[expert]:.0%} |"
        for expert, count in check.prompts_per_expert.items()
    )
    by_layer = ", ".join(f"{value:.0%}" for value in accuracy.token_accuracy_by_layer)
    return (
        "## Routing check\n\n"
        "Each expert's positive prompts were run through this checkpoint right after the merge. A prompt reaches "
        "an expert when that expert has the largest router probability summed over all layers and tokens; the "
        "token share counts (token, layer) pairs whose top-1 expert is the prompt's own.\n\n"
        "| # | expert | prompts reaching it | tokens choosing it first |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Overall: {check.hits}/{check.prompts} prompts, {accuracy.token_accuracy:.0%} of tokens "
        f"(by layer: {by_layer}). Reproduce with `frankenmoe route OUT --labels FILE`.\n"
    )
