"""Fine-tune the benchmark's domain experts from SmolLM2-135M-Instruct, cached.

    .venv/bin/python -m benchmarks.quality.build_experts [--full] [--domains code maths] [--steps N] [--lr LR] [--threads 2]

Without --full: MLP-only experts (the ideal case for a frankenMoE), one recipe per domain (RECIPES),
in benchmarks/.cache/quality/experts/<domain>/. With --full: full fine-tunes (every weight but the
tied embeddings/head; FULL_RECIPES) in benchmarks/.cache/quality/experts/<domain>-full/. --steps /
--lr override the recipe for every domain built. Each expert is saved with its training log; an
expert whose log shows the same settings is kept, so re-running only builds what is missing or what
changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.quality.domains import EXPERT_DOMAINS, EXPERTS, base_model, blocks
from benchmarks.quality.training import TRAINING_LOG, TrainingSettings, settings_record, train_mlp_expert

# (steps, learning rate) per domain. Code needs several hundred steps to move held-out stdlib code
# clearly (64 steps at 5e-4 gave only -3% perplexity); the maths expert already cuts maths
# perplexity by 75% after 64 steps, so it keeps that cheaper recipe.
RECIPES: dict[str, tuple[int, float]] = {"code": (300, 3e-4), "maths": (64, 5e-4)}
# Full fine-tunes (every weight but the tied embeddings/head): (steps, learning rate, warm-up steps).
# Close to the MLP-only budget (RECIPES; code 200 steps instead of 300, for the time a full step
# takes here), at a lower learning rate with a linear warm-up: a pilot at 5e-4 with no warm-up
# (14 code steps) made held-out code worse while its training loss fell, as attention and norms moved
# too far on a cold AdamW. A full step takes about 10 s in float32 on 2 idle cores (bf16 autocast is
# slower there: its backward falls back to a plain gemm). See README "Full fine-tunes". --steps /
# --lr override the recipe.
FULL_RECIPES: dict[str, tuple[int, float, int]] = {"code": (200, 1e-4, 20), "maths": (64, 1e-4, 6)}
FULL_BF16_AUTOCAST = False


def expert_folder(domain: str, full: bool = False) -> Path:
    """Where the domain's MLP-only (or, with `full`, full fine-tune) expert is cached."""
    return EXPERTS / (f"{domain}-full" if full else domain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="Training steps for every domain built (default: RECIPES).")
    parser.add_argument("--lr", type=float, help="AdamW learning rate for every domain built (default: RECIPES).")
    parser.add_argument("--full", action="store_true", help="Full fine-tunes (FULL_RECIPES) instead of MLP-only.")
    parser.add_argument("--domains", nargs="+", default=list(EXPERT_DOMAINS), choices=EXPERT_DOMAINS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = base_model()
    tokenizer = AutoTokenizer.from_pretrained(base)
    for domain in args.domains:
        steps, learning_rate, warmup = FULL_RECIPES[domain] if args.full else (*RECIPES[domain], 0)
        settings = TrainingSettings(
            steps=args.steps or steps,
            learning_rate=args.lr or learning_rate,
            seed=EXPERT_DOMAINS.index(domain),
            report_every=1 if args.full else 10,
            trained="full" if args.full else "mlp",
            warmup_steps=warmup,
            bf16_autocast=not (args.full and not FULL_BF16_AUTOCAST),
        )
        out = expert_folder(domain, args.full)
        log_file = out / TRAINING_LOG
        if log_file.is_file() and json.loads(log_file.read_text())["settings"] == settings_record(settings):
            print(f"{out.name}: cached in {out}")
            continue
        train = blocks(domain, "train", tokenizer, settings.steps * settings.batch_size)
        print(
            f"{out.name}: training ({settings.trained}) {settings.steps} steps on {train.numel()} tokens ...",
            flush=True,
        )
        log = train_mlp_expert(base, out, train, settings)
        first, last = sum(log.losses[:10]) / 10, sum(log.losses[-10:]) / 10
        print(f"{out.name}: loss {first:.3f} -> {last:.3f} in {log.seconds:.0f} s; saved to {out}", flush=True)


if __name__ == "__main__":
    main()
