"""Is a merge any good: held-out perplexity per domain of a MoE checkpoint, its base and its experts.

Every model is streamed layer by layer with frankenmoe's own decoder (frankenmoe.decoder.layers), the MoE as
`frankenmoe route` runs it (every layer's attention, router and experts, with the output
architecture's routing semantics), the base and the experts as dense models. Memory stays at one
layer's attention weights, one slice of one matrix per slice worker, and the activations of one batch
of windows, whatever the model's size.

Windows. A domain's documents are tokenised with the checkpoint's tokenizer (no special tokens),
joined with the end-of-text token after each document, and cut into windows of `window` tokens,
one starting every `stride` tokens; the tail that does not fill a window is dropped, so every
model sees the same tokens. The first window scores every next-token prediction in it (window - 1);
each later window scores only the predictions of its last `stride` tokens (all but its first token
when stride == window), so with overlapping windows every token is scored once, with at least
window - stride tokens of context. The top-1 share counts the same new tokens, at every layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from frankenmoe.architectures.tables import SOURCE_FAMILIES
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.checkpoint.manifest import MANIFEST_NAME, read_manifest, weight_fingerprint
from frankenmoe.decoder.layers import StreamedDecoder
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.io.safetensors import TensorLocation
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.sources.model import index_tensors, read_model_config, resolve_reference

DEFAULT_WINDOW = 256
"""Tokens per window: the quality benchmark's block length."""
BATCH_BYTES = 256 * 1024 * 1024
"""Float32 activations one batch of windows may take in the widest matrix product (the MLP's
intermediate); each batch streams the whole model once, so larger batches read the model fewer times."""

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


@dataclass(frozen=True)
class ModelScore:
    """One model on one domain."""

    perplexity: float
    tokens: int
    """Next-token predictions scored."""
    top1_share: tuple[float, ...] | None
    """For a MoE: the share of (new token, layer) pairs whose top-1 expert is each expert; None when dense."""


@dataclass(frozen=True)
class EvaluatedModel:
    """A model that was scored: `role` is moe, base or expert; `names` every name it answers to (a
    folder named twice in the manifest, e.g. the base as an expert too, is scored once)."""

    names: tuple[str, ...]
    role: str
    reference: str
    path: Path
    scores: dict[str, ModelScore]


@dataclass(frozen=True)
class DomainResult:
    """One row of the table."""

    domain: str
    tokens: int
    moe_perplexity: float
    base_perplexity: float
    best_expert: str
    """The expert (or --model source) with the lowest perplexity on this domain."""
    best_expert_perplexity: float
    kept: float | None
    """(ppl_base - ppl_moe) / (ppl_base - ppl_best): 1 = the MoE keeps all of the best expert's gain over
    the base, 0 = none, negative = worse than the base; None when no expert beats the base here."""
    top1_share: tuple[float, ...]
    """The MoE's top-1 share per expert on this domain (see ModelScore)."""


@dataclass(frozen=True)
class EvaluationReport:
    checkpoint: Path
    window: int
    stride: int
    expert_names: tuple[str, ...]
    """The checkpoint's experts in order (their manifest references where known)."""
    models: tuple[EvaluatedModel, ...]
    domains: tuple[DomainResult, ...]

    def below(self, min_kept: float) -> list[DomainResult]:
        """Domains whose kept share is measurable and under `min_kept` (the CI gate)."""
        return [row for row in self.domains if row.kept is not None and row.kept < min_kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "window": self.window,
            "stride": self.stride,
            "expert_names": list(self.expert_names),
            "domains": [
                {
                    "domain": row.domain,
                    "tokens": row.tokens,
                    "moe_perplexity": row.moe_perplexity,
                    "base_perplexity": row.base_perplexity,
                    "best_expert": row.best_expert,
                    "best_expert_perplexity": row.best_expert_perplexity,
                    "kept": row.kept,
                    "top1_share": list(row.top1_share),
                }
                for row in self.domains
            ],
            "models": [
                {
                    "names": list(model.names),
                    "role": model.role,
                    "reference": model.reference,
                    "path": str(model.path),
                    "perplexity": {domain: score.perplexity for domain, score in model.scores.items()},
                }
                for model in self.models
            ],
        }


def gain_kept(base_perplexity: float, moe_perplexity: float, expert_perplexity: float) -> float | None:
    """Share of the expert's perplexity gain over the base that the MoE keeps; None without a gain."""
    gain = base_perplexity - expert_perplexity
    return None if gain <= 0 else (base_perplexity - moe_perplexity) / gain


# --- texts -------------------------------------------------------------------------------------------


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


# --- models ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A dense model to score: its name, role (base or expert), reference and folder."""

    name: str
    role: str
    reference: str
    path: Path


def resolve_models(checkpoint: Path, overrides: Mapping[str, str]) -> list[ModelSpec]:
    """The base and each expert from the checkpoint's manifest (`base`, `expert0`, `expert1`, ...), with
    `overrides` (name -> model reference) replacing or adding entries; without a manifest, `overrides`
    must name the base (`base=REF`) and the rest are experts. Each source must still be where the manifest
    says, with the weight files it recorded."""
    if not (checkpoint / MANIFEST_NAME).is_file():
        if not overrides:
            raise ModelError(
                f"{checkpoint} has no {MANIFEST_NAME}, so its base and experts are unknown. Name them with "
                "--model base=REF --model NAME=REF ... (a folder or a Hugging Face id in the local cache)."
            )
        if "base" not in overrides:
            raise ConfigError(
                f"{checkpoint} has no {MANIFEST_NAME}; name its base model too, with --model base=REF "
                f"(given: {', '.join(overrides)})."
            )
        return [_given(name, reference) for name, reference in overrides.items()]
    specs: dict[str, ModelSpec] = {}
    for record in read_manifest(checkpoint).get("sources", []):
        role = str(record.get("role", ""))
        name = "base" if role == "base" else role.replace("experts[", "expert").rstrip("]")
        if not (role == "base" or role.startswith("experts[")):
            continue  # the shared expert: an MLP every token already passes through, not a source to beat
        specs[name] = _given(name, overrides[name]) if name in overrides else _recorded(name, role, record)
    specs.update({name: _given(name, reference) for name, reference in overrides.items() if name not in specs})
    return list(specs.values())


def _given(name: str, reference: str) -> ModelSpec:
    return ModelSpec(name, "base" if name == "base" else "expert", reference, resolve_reference(reference))


def _recorded(name: str, role: str, record: Mapping[str, Any]) -> ModelSpec:
    reference = str(record.get("reference"))
    folder = Path(str(record.get("folder")))
    fix = f"Put it back, or name where it is now with --model {name}=REF."
    if record.get("adapter_files"):
        raise ModelError(
            f"Source {role} ({reference}) is a model plus a LoRA adapter, which eval cannot run as a dense model. "
            f"Merge the adapter into a folder and pass --model {name}=FOLDER."
        )
    if not folder.is_dir():
        raise ModelError(
            f"Source {role} ({reference}) is no longer at {folder}, where the manifest says the merge read it. {fix}"
        )
    for file in record.get("files", []):
        path = folder / str(file.get("name"))
        if not path.is_file():
            raise ModelError(f"Source {role} ({reference}): {path}, which the merge read, is gone. {fix}")
        if "sampled_sha256" in file and weight_fingerprint(path) != file:
            raise ModelError(
                f"Source {role} ({reference}): {path} is not the file the merge read (its size or sampled hash "
                f"changed), so it is not the model the MoE was built from. {fix}"
            )
    return ModelSpec(name, "base" if role == "base" else "expert", reference, folder)


@dataclass(frozen=True)
class _Runnable:
    config: dict[str, Any]
    tensors: Mapping[str, TensorLocation]


def _dense_model(spec: ModelSpec, vocab_size: int) -> _Runnable:
    config = read_model_config(spec.reference, spec.path)
    if str(config.get("model_type")) not in SOURCE_FAMILIES:
        raise ModelError(
            f"Model {spec.name} ({spec.reference}) has model_type {config.get('model_type')!r}; eval scores dense "
            f"sources of the families {', '.join(sorted(SOURCE_FAMILIES))}."
        )
    if int(config.get("vocab_size", -1)) != vocab_size:
        raise ModelError(
            f"Model {spec.name} ({spec.reference}) has a vocabulary of {config.get('vocab_size')}, the checkpoint "
            f"{vocab_size}: they do not share its tokenizer, so their perplexities cannot be compared."
        )
    return _Runnable(config, index_tensors(spec.reference, spec.path))


# --- scoring -----------------------------------------------------------------------------------------


def windows_per_batch(config: Mapping[str, Any], window: int) -> int:
    """How many windows go through the model together (see BATCH_BYTES); one at least."""
    widths = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "hidden_size")
    widest = max(int(config.get(key) or 0) for key in widths)
    # The MLP holds its gate and up products and their concatenation: about three intermediates per token.
    return max(1, BATCH_BYTES // (3 * 4 * widest * window))


def score_model(
    config: dict[str, Any],
    tensors: Mapping[str, TensorLocation],
    windows: Mapping[str, TokenWindows],
    device: torch.device | None = None,
    on_layer: Callable[[], None] | None = None,
) -> dict[str, ModelScore]:
    """Perplexity (and for a MoE the top-1 share) of one model on every domain's windows, streamed.

    The windows of all domains go through the model in batches (`windows_per_batch`); every layer of
    a batch is one `forward_layer` call over all its windows. `on_layer` is called after each layer of
    each batch (progress).
    """
    decoder = StreamedDecoder(config, tensors, device or torch.device("cpu"))
    items = [(domain, index) for domain, domain_windows in windows.items() for index in range(len(domain_windows.ids))]
    per_batch = windows_per_batch(config, next(iter(windows.values())).ids.shape[1])
    experts = int(config.get(decoder.moe.expert_count_key) or 0) if decoder.moe is not None else 0
    losses = dict.fromkeys(windows, 0.0)
    counts = {domain: torch.zeros(experts, dtype=torch.long) for domain in windows}
    chunk = 4 * int(config["hidden_size"])  # tokens per head pass: keeps [tokens, head slice] logits near 16 MiB
    for first in range(0, len(items), per_batch):
        batch = items[first : first + per_batch]
        ids = [windows[domain].ids[index] for domain, index in batch]
        new_from = [windows[domain].new_from[index] for domain, index in batch]
        hidden = [decoder.embed(window_ids) for window_ids in ids]
        for layer in range(decoder.num_layers):
            layer_pass = decoder.forward_layer(layer, hidden)
            hidden = layer_pass.hidden
            for (domain, _), start, logits in zip(batch, new_from, layer_pass.router_logits or [], strict=False):
                counts[domain] += torch.bincount(logits[start:].argmax(dim=-1).cpu(), minlength=experts)
            if on_layer is not None:
                on_layer()
        states = torch.cat([state[0, max(1, start) - 1 : -1] for state, start in zip(hidden, new_from, strict=True)])
        targets = torch.cat([window_ids[max(1, start) :] for window_ids, start in zip(ids, new_from, strict=True)])
        with torch.no_grad():
            log_probabilities = torch.cat(
                [
                    decoder.target_log_probabilities(
                        states[at : at + chunk], targets[at : at + chunk].to(decoder.device)
                    )
                    for at in range(0, len(targets), chunk)
                ]
            ).cpu()
        scored_lengths = [len(window_ids) - max(1, start) for window_ids, start in zip(ids, new_from, strict=True)]
        for (domain, _), window_scores in zip(batch, log_probabilities.split(scored_lengths), strict=True):
            losses[domain] -= float(window_scores.double().sum())
    scores = {}
    for domain, domain_windows in windows.items():
        total = counts[domain].sum()
        shares = tuple(float(count) / float(total) for count in counts[domain]) if experts and total else None
        scores[domain] = ModelScore(math.exp(losses[domain] / domain_windows.scored), domain_windows.scored, shares)
    return scores


def score_folder(
    folder: Path, windows: Mapping[str, TokenWindows], device: torch.device | None = None
) -> dict[str, ModelScore]:
    """`score_model` on the model in `folder`: a MoE checkpoint of any output architecture, or a dense model."""
    config = read_model_config(str(folder), folder)
    if str(config.get("model_type")) in SOURCE_FAMILIES:
        return score_model(config, index_tensors(str(folder), folder), windows, device)
    checkpoint = load_checkpoint(folder)
    return score_model(checkpoint.config, checkpoint.tensors, windows, device)


def evaluate_checkpoint(
    checkpoint: Path,
    texts: Mapping[str, DomainText],
    models: Mapping[str, str] | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Score the MoE in `checkpoint`, its base and each expert on every domain of `texts` (see the module
    docstring); everything is checked before the first model runs."""
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(
            f"--window must be at least 2 and --stride between 1 and the window (got {window} and {stride})."
        )
    if not texts:
        raise ConfigError("No text to score. Pass --text NAME=FILE (repeatable), one per domain.")
    moe = load_checkpoint(checkpoint)
    limit = int(moe.config.get("max_position_embeddings") or window)
    if window > limit:
        raise ConfigError(
            f"--window {window} is longer than the model's context ({limit} tokens). Use a smaller --window."
        )
    windows = {name: domain_windows(checkpoint, name, text, window, stride) for name, text in texts.items()}
    specs = resolve_models(checkpoint, models or {})
    if not any(spec.role == "base" for spec in specs):
        raise ModelError(f"{checkpoint}'s manifest names no base model. Name it with --model base=REF.")
    if not any(spec.role == "expert" for spec in specs):
        raise ConfigError("No expert to compare with: the manifest lists none and no --model NAME=REF names one.")
    vocab_size = int(moe.config["vocab_size"])
    distinct: dict[Path, list[ModelSpec]] = {}
    for spec in specs:
        distinct.setdefault(spec.path.resolve(), []).append(spec)
    dense = {path: _dense_model(group[0], vocab_size) for path, group in distinct.items()}

    def scored(name: str, config: dict[str, Any], tensors: Mapping[str, TensorLocation]) -> dict[str, ModelScore]:
        from tqdm import tqdm

        batches = math.ceil(sum(len(item.ids) for item in windows.values()) / windows_per_batch(config, window))
        total = batches * int(config["num_hidden_layers"])
        with tqdm(total=total, desc=f"eval {name}", unit="layer", disable=not progress) as bar:
            return score_model(config, tensors, windows, device, bar.update)

    evaluated = [EvaluatedModel(("moe",), "moe", str(checkpoint), checkpoint, scored("moe", moe.config, moe.tensors))]
    for path, group in distinct.items():
        names = tuple(spec.name for spec in group)
        role = "base" if any(spec.role == "base" for spec in group) else "expert"
        scores = scored("/".join(names), dense[path].config, dense[path].tensors)
        evaluated.append(EvaluatedModel(names, role, group[0].reference, group[0].path, scores))
    expert_names = tuple(spec.name for spec in specs if spec.role == "expert")
    return EvaluationReport(
        checkpoint,
        window,
        stride,
        _checkpoint_expert_names(specs, moe.num_experts),
        tuple(evaluated),
        tuple(_domain_row(domain, evaluated, expert_names) for domain in windows),
    )


def _checkpoint_expert_names(specs: Sequence[ModelSpec], count: int) -> tuple[str, ...]:
    by_name = {spec.name: spec.reference for spec in specs}
    return tuple(by_name.get(f"expert{index}", f"expert {index}") for index in range(count))


def _domain_row(domain: str, evaluated: Sequence[EvaluatedModel], expert_names: Sequence[str]) -> DomainResult:
    moe = evaluated[0].scores[domain]
    base = next(model for model in evaluated if "base" in model.names).scores[domain]
    perplexity = {name: model.scores[domain].perplexity for model in evaluated for name in model.names}
    best = min(expert_names, key=lambda name: perplexity[name])
    return DomainResult(
        domain=domain,
        tokens=moe.tokens,
        moe_perplexity=moe.perplexity,
        base_perplexity=base.perplexity,
        best_expert=best,
        best_expert_perplexity=perplexity[best],
        kept=gain_kept(base.perplexity, moe.perplexity, perplexity[best]),
        top1_share=moe.top1_share or (),
    )
