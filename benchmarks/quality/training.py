"""Domain experts by fine-tuning a dense model: only the MLPs, or every weight but the embeddings.

In a frankenMoE only the MLPs become experts, so an MLP-only expert (gate/up/down_proj of every
layer) is exactly the kind of fine-tune a merge can keep whole: attention, norms and embeddings stay
the base model's. A full fine-tune (`trained="full"`) also moves attention and norms, as the experts
of real frankenMoE recipes do; its embeddings (tied to the output head in SmolLM2) stay frozen so
the tokenizer's rows stay the base's, see benchmarks/quality/README.md.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

MLP_PARAMETER_PARTS = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")
EMBEDDING_PARAMETER_PARTS = ("embed_tokens.", "lm_head.")
TRAINED_PARTS = ("mlp", "full")
TRAINING_LOG = "training.json"


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 64
    batch_size: int = 4
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    seed: int = 0
    bf16_autocast: bool = True
    report_every: int = 0
    trained: str = "mlp"
    """"mlp": only the MLPs; "full": every weight except the (tied) embeddings and output head."""
    warmup_steps: int = 0
    """The learning rate rises linearly from lr / warmup_steps to lr over these first steps."""


def settings_record(settings: TrainingSettings) -> dict:
    """The settings as recorded in an expert's training log. `trained` is left out when it is "mlp",
    and `warmup_steps` when it is 0, so the logs (and the cached results keyed by them) of experts
    built before those fields existed stay valid."""
    record = asdict(settings)
    if record["trained"] == "mlp":
        del record["trained"]
    if record["warmup_steps"] == 0:
        del record["warmup_steps"]
    return record


@dataclass(frozen=True)
class TrainingLog:
    settings: TrainingSettings
    trainable_parameters: int
    frozen_parameters: int
    losses: tuple[float, ...]
    seconds: float


def freeze_all_but_mlp(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Make only the MLP weights trainable; returns them."""
    trainable = []
    for name, parameter in model.named_parameters():
        is_mlp = any(part in name for part in MLP_PARAMETER_PARTS)
        parameter.requires_grad_(is_mlp)
        if is_mlp:
            trainable.append(parameter)
    if not trainable:
        raise ValueError("The model has no gate_proj/up_proj/down_proj MLP weights to train.")
    return trainable


def freeze_embeddings(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Make every weight but the token embeddings and output head trainable; returns them."""
    trainable = []
    for name, parameter in model.named_parameters():
        train = not any(part in name for part in EMBEDDING_PARAMETER_PARTS)
        parameter.requires_grad_(train)
        if train:
            trainable.append(parameter)
    return trainable


def train_mlp_expert(base: Path, out: Path, blocks: torch.Tensor, settings: TrainingSettings) -> TrainingLog:
    """Fine-tune the model in `base` on token `blocks` ([N, T]) and save it to `out`: its MLPs, or with
    `settings.trained == "full"` every weight but the embeddings and head.

    Batches are drawn in a seeded order (the blocks are cycled if steps x batch exceeds them). The
    model trains in float32 (bf16 autocast for speed) and is saved in the base model's dtype, so an
    expert and the base are stored alike and a merge copies the expert's MLPs unchanged.
    """
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    saved_dtype = _stored_dtype(base)
    model.train()
    if settings.trained not in TRAINED_PARTS:
        raise ValueError(f"trained must be one of {TRAINED_PARTS}, not {settings.trained!r}")
    trainable = freeze_all_but_mlp(model) if settings.trained == "mlp" else freeze_embeddings(model)
    frozen = sum(parameter.numel() for parameter in model.parameters() if not parameter.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(settings.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = _batch_order(len(blocks), settings)
    losses = []
    started = time.perf_counter()
    for step in range(settings.steps):
        batch = blocks[order[step * settings.batch_size : (step + 1) * settings.batch_size]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16_autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if settings.report_every and (step + 1) % settings.report_every == 0:
            elapsed = time.perf_counter() - started
            print(f"  step {step + 1}/{settings.steps}: loss {losses[-1]:.3f} ({elapsed:.0f} s)", flush=True)
    log = TrainingLog(
        settings=settings,
        trainable_parameters=sum(parameter.numel() for parameter in trainable),
        frozen_parameters=frozen,
        losses=tuple(losses),
        seconds=time.perf_counter() - started,
    )
    _save(model.to(saved_dtype), base, out, log)
    return log


def _batch_order(block_count: int, settings: TrainingSettings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    needed = settings.steps * settings.batch_size
    rounds = -(-needed // block_count)
    return torch.cat([torch.randperm(block_count, generator=generator) for _ in range(rounds)])[:needed]


def _stored_dtype(folder: Path) -> torch.dtype:
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name))


def _save(model: PreTrainedModel, base: Path, out: Path, log: TrainingLog) -> None:
    """Write to a staging folder first, so an interrupted run never leaves a half-written expert."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    record = {**asdict(log), "settings": settings_record(log.settings)}
    (staging / TRAINING_LOG).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
