"""Laser: denoise weight matrices by rank reduction during the merge (formulas in docs/laser.md).

Planning chooses which matrices each `laser` block considers (`laser_plan.laser_group`), and its
last step (`planning.decide_lasers`) runs this analysis: `analyse_lasers` reads the considered
matrices one at a time, keeps only a few scalars per matrix (its SNR, rank and proposed rank),
chooses the reductions, optionally checks each one against a calibration text's perplexity, and
returns every matrix's decision, whose ranks the plan's pieces then carry. The writer applies a
piece's rank with `apply_laser`.

SVD cost: the analysis needs only singular values (`svdvals`); the writer computes the full SVD of
each reduced matrix once more when it writes it. The calibration check also builds the reduced
matrix, so a checked reduction is decomposed twice: simpler than caching reduced matrices, and it
keeps memory at one matrix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from frankenmoe.config.schema import LaserConfig
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.errors import ConfigError
from frankenmoe.io.safetensors import read_tensor
from frankenmoe.merging.laser_plan import LaserGroup, LaserResult, LaserTarget
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.sources.model import SourceModel

logger = logging.getLogger("frankenmoe")

MIN_KEPT_RANK = 1
"""A threshold above every singular value would zero the matrix, which no denoising intends."""
CALIBRATION_WINDOW = 512
"""Calibration text is split into windows of at most this many tokens (or the model's context)."""
IQR_TO_SIGMA = 1.349
"""The interquartile range of a normal distribution is 1.349 standard deviations."""


@dataclass(frozen=True)
class Spectrum:
    """What the analysis keeps of one matrix: scalars only."""

    snr: float
    rank: int
    proposed_rank: int


def singular_values(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Singular values in descending order, computed in float32 on `device`, returned on the CPU."""
    return torch.linalg.svdvals(weight.to(device=device, dtype=torch.float32)).cpu()


def aspect_ratio(shape: tuple[int, ...]) -> float:
    return min(shape) / max(shape)


def snr_threshold(values: torch.Tensor, shape: tuple[int, ...]) -> float:
    """tau = sigma * (1 + sqrt(beta)), sigma estimated robustly as IQR(S) / 1.349."""
    upper, lower = torch.quantile(values.double(), torch.tensor([0.75, 0.25], dtype=torch.float64)).tolist()
    sigma = (upper - lower) / IQR_TO_SIGMA
    return sigma * (1 + math.sqrt(aspect_ratio(shape)))


def signal_to_noise(values: torch.Tensor, threshold: float) -> float:
    """Sum of the singular values above the threshold over the sum of those at or below it."""
    signal = float(values[values > threshold].double().sum())
    noise = float(values[values <= threshold].double().sum())
    return signal / noise if noise > 0 else math.inf


def optimal_threshold(values: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Gavish-Donoho hard threshold for unknown noise: omega(beta) * median(S)."""
    beta = aspect_ratio(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return omega * float(torch.quantile(values.double(), 0.5))


def numerical_rank(values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Singular values above float32 round-off of the largest one, as torch.linalg.matrix_rank counts."""
    if not len(values):
        return 0
    tolerance = float(values[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((values > tolerance).sum())


def spectrum(values: torch.Tensor, shape: tuple[int, ...], settings: LaserConfig) -> Spectrum:
    """SNR, numerical rank and the rank the block's method would keep."""
    snr = signal_to_noise(values, snr_threshold(values, shape))
    if settings.method == "fixed":
        assert settings.keep_fraction is not None  # config validation requires it for `fixed`
        proposed = math.floor(settings.keep_fraction * min(shape))
    else:
        threshold = snr_threshold(values, shape) if settings.method == "snr" else optimal_threshold(values, shape)
        proposed = int((values > threshold).sum())
    return Spectrum(snr, numerical_rank(values, shape), max(MIN_KEPT_RANK, proposed))


def truncate(weight: torch.Tensor, rank: int, device: torch.device) -> torch.Tensor:
    """The best rank-`rank` approximation of `weight` (truncated SVD), float32 on the CPU, same shape."""
    left, values, right = torch.linalg.svd(weight.to(device=device, dtype=torch.float32), full_matrices=False)
    return ((left[:, :rank] * values[:rank]) @ right[:rank]).cpu()


def apply_laser(tensor: torch.Tensor, target: LaserTarget | None, device: torch.device) -> torch.Tensor:
    """The writer's step: reduce a piece's float32 tensor when the analysis decided to."""
    if target is None or target.keep_rank is None:
        return tensor
    return truncate(tensor, target.keep_rank, device)


def analyse_lasers(
    groups: tuple[LaserGroup, ...], tokenizer_source: SourceModel, device: torch.device, show_progress: bool = False
) -> tuple[LaserResult, ...]:
    """Measure and decide every matrix of every laser block, in block then matrix order.

    `tokenizer_source` is the base model: calibration text is tokenised as the merged model will tokenise it.
    """
    results: list[LaserResult] = []
    for group in groups:
        results.extend(analyse_group(group, tokenizer_source, device, show_progress))
    return tuple(results)


def analyse_group(
    group: LaserGroup, tokenizer_source: SourceModel, device: torch.device, show_progress: bool = False
) -> list[LaserResult]:
    """Measure every matrix of one block (one at a time), pick the candidates, check them if asked."""
    settings = group.settings
    spectra = [
        spectrum(singular_values(read_tensor(matrix.location), device), matrix.location.shape, settings)
        for matrix in tqdm(group.matrices, desc=f"laser {group.path}", unit="matrix", disable=not show_progress)
    ]
    order = sorted(range(len(spectra)), key=lambda index: spectra[index].snr)
    chosen = set(order[: settings.top_k] if settings.method == "snr" and settings.top_k is not None else order)
    proposals = {
        index: spectra[index].proposed_rank for index in chosen if spectra[index].proposed_rank < spectra[index].rank
    }
    verdicts: dict[int, str | None] = dict.fromkeys(proposals)
    if settings.calibration is not None and proposals:
        verdicts = check_perplexity(group, tokenizer_source, proposals, device)

    results = []
    for index, (matrix, measured) in enumerate(zip(group.matrices, spectra, strict=True)):
        reduced = index in proposals and verdicts[index] is None
        if index not in chosen:
            note = f"not among the {settings.top_k} lowest-SNR matrices"
        elif index not in proposals:
            note = f"{settings.method} keeps all {measured.rank} singular values"
        else:
            note = verdicts[index] or "reduced"
        results.append(
            LaserResult(
                group=group.path,
                tensor=matrix.location.name,
                layer=matrix.layer,
                matrix=matrix.matrix,
                snr=measured.snr,
                rank_before=measured.rank,
                rank_after=proposals[index] if reduced else measured.rank,
                reduced=reduced,
                note=note,
            )
        )
        logger.info("laser %s %s: %s", group.path, matrix.location.name, note)
    return results


def check_perplexity(
    group: LaserGroup, tokenizer_source: SourceModel, proposals: dict[int, int], device: torch.device
) -> dict[int, str | None]:
    """Greedy acceptance in layer order: a reduction is kept if the source model's perplexity on the
    calibration text (with every reduction accepted so far) does not rise. Returns, per proposal,
    None when accepted or the reason for rejecting it.

    Only the residual stream entering the current layer is cached: each check runs the candidate's
    layer and the layers after it, never the ones before.
    """
    assert group.settings.calibration is not None
    decoder = StreamedDecoder(group.source.config, group.source.tensors, device)
    sequences = calibration_sequences(group, tokenizer_source)
    stream = [decoder.embed(tokens) for tokens in sequences]
    best = _perplexity(decoder, sequences, stream, 0, {})
    position = 0
    accepted_in_layer: dict[str, torch.Tensor] = {}
    verdicts: dict[int, str | None] = {}
    for index in sorted(proposals, key=lambda index: group.matrices[index].layer):
        matrix = group.matrices[index]
        while position < matrix.layer:
            stream = _run_layer(decoder, position, accepted_in_layer, stream)
            position, accepted_in_layer = position + 1, {}
        reduced = truncate(read_tensor(matrix.location), proposals[index], device)
        trial = {**accepted_in_layer, matrix.name_in_layer: reduced}
        perplexity = _perplexity(decoder, sequences, stream, position, trial)
        if perplexity <= best:
            verdicts[index] = None
            accepted_in_layer, best = trial, perplexity
        else:
            verdicts[index] = f"rejected: calibration perplexity would rise from {best:.4g} to {perplexity:.4g}"
    return verdicts


def calibration_sequences(group: LaserGroup, tokenizer_source: SourceModel) -> list[torch.Tensor]:
    """The calibration text as token windows, tokenised as the merged model will tokenise it."""
    calibration = group.settings.calibration
    assert calibration is not None
    try:
        text = Path(calibration).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"`{group.path}.calibration` ({calibration}) cannot be read as UTF-8 text: {error}."
        ) from None
    token_ids = list(load_tokenizer(tokenizer_source.path)(text, add_special_tokens=True)["input_ids"])
    context = int(group.source.config.get("max_position_embeddings") or CALIBRATION_WINDOW)
    window = min(CALIBRATION_WINDOW, context)
    windows = [token_ids[start : start + window] for start in range(0, len(token_ids), window)]
    sequences = [torch.tensor(ids, dtype=torch.long) for ids in windows if len(ids) >= 2]
    if not sequences:
        raise ConfigError(
            f"`{group.path}.calibration` ({calibration}) holds fewer than two tokens, so it has no perplexity. "
            "Use a file with a few paragraphs of representative text."
        )
    return sequences


def _run_layer(
    decoder: StreamedDecoder, layer: int, overrides: dict[str, torch.Tensor], hidden: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Every calibration window through layer `layer`, with the reductions in `overrides` in place."""
    return decoder.forward_layer(layer, hidden, overrides=overrides).hidden


def _perplexity(
    decoder: StreamedDecoder,
    sequences: list[torch.Tensor],
    stream: list[torch.Tensor],
    start: int,
    overrides: dict[str, torch.Tensor],
) -> float:
    """Perplexity of the whole calibration text, running layers `start`.. from the cached stream."""
    hidden = stream
    for layer in range(start, decoder.num_layers):
        hidden = _run_layer(decoder, layer, overrides if layer == start else {}, hidden)
    total, count = 0.0, 0
    for tokens, state in zip(sequences, hidden, strict=True):
        logits = decoder.logits(state)
        targets = tokens[1:].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
        count += len(targets)
    return math.exp(total / count)
