"""Merge quality when the experts are full fine-tunes (attention and norms moved too), cached.

    .venv/bin/python -m benchmarks.quality.build_experts --full --threads 2   # the experts, once
    .venv/bin/python -m benchmarks.quality.full_finetunes --threads 2         # dense rows + frankenmoe merges
    .venv/bin/python -m benchmarks.quality.mergekit_reference                 # the reference tool's merge
    .venv/bin/python -m benchmarks.quality.full_finetunes --table-only

Every merge is base + code + maths full fine-tunes, keyword prompts, top-2 (run.MAIN_SET). A
frankenMoE keeps only each expert's MLPs; the shared tensors (attention, norms, embeddings, head)
come from the base (frankenmoe's default) or, in the shared-trunk rows, from a merge of the sources
(the config's `shared_weights` block; those rows are skipped with a note while this frankenmoe build
does not know the block). Gain kept is measured against each full fine-tune's own perplexity.
Results are cached in benchmarks/.cache/quality/full-results.json (each with what it was computed
from, stale ones are redone); the tables go to the full fine-tune section of results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from benchmarks.quality.build_experts import expert_folder
from benchmarks.quality.domains import CACHE, EVAL_DOMAINS, EXPERT_DOMAINS, base_model, blocks
from benchmarks.quality.evaluate import gain_retained, relative_change
from benchmarks.quality.run import MAIN_SET, MERGES, PROMPTS, Variant, evaluate_folder, merge_variant, write_results
from benchmarks.quality.training import TRAINING_LOG
from frankenmoe.errors import FrankenMoEError

RESULTS = CACHE / "full-results.json"
MERGEKIT_NAME = "mergekit-moe 0.1.5 | hidden | keyword | shared: base"

# (row label, shared_weights block) for the frankenmoe merges, most important first.
SHARED_TRUNKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("base", {}),
    ("task_arithmetic lambda=1.0", {"method": "task_arithmetic", "lambda": 1.0}),
    ("dare_ties density=0.5", {"method": "dare_ties", "density": 0.5}),
    # Equal thirds of base, code and maths: the general expert is the base itself, so its weight is
    # 0 here (base_weight 1 already counts the base once).
    ("linear, base/code/maths 1/3 each", {"method": "linear", "weights": [0.0, 1.0, 1.0], "base_weight": 1.0}),
)


def full_expert_folders() -> dict[str, Path]:
    return {domain: expert_folder(domain, full=True) for domain in EXPERT_DOMAINS}


def variants() -> list[Variant]:
    """fit (the recommended mode) and hidden with the base's shared weights, then fit with each merged trunk."""
    chosen = []
    for mode in ("fit", "hidden"):
        chosen.append(Variant(f"{MAIN_SET} | {mode} | keyword | shared: base", MAIN_SET, mode, "keyword"))
    for label, block in SHARED_TRUNKS[1:]:
        chosen.append(Variant(f"{MAIN_SET} | fit | keyword | shared: {label}", MAIN_SET, "fit", "keyword", {}, block))
    return chosen


def supports_shared_weights() -> bool:
    """Whether this frankenmoe build knows the config's `shared_weights` block."""
    try:
        variants()[2].resolved_router()
    except FrankenMoEError:
        return False
    return True


def expert_settings(domain: str) -> dict[str, Any]:
    return json.loads((full_expert_folders()[domain] / TRAINING_LOG).read_text())["settings"]


def depends_on(job: str | Variant) -> dict[str, Any]:
    """What a cached result was computed from (a different record means stale, recomputed)."""
    if job == "base":
        return {}
    if job == MERGEKIT_NAME:
        return {"experts": {domain: expert_settings(domain) for domain in EXPERT_DOMAINS}, "tool": "mergekit==0.1.5"}
    if isinstance(job, str):
        domain = job.split()[0]
        return {"expert": expert_settings(domain)}
    experts = {domain: expert_settings(domain) for domain in EXPERT_DOMAINS}
    return {"experts": experts, "router": asdict(job.resolved_router()), "shared_weights": job.shared_weights}


def load_results() -> dict[str, Any]:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"dense": {}, "merges": {}}


def save_results(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def _eval_blocks(base: Path, count: int) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(base)
    return {domain: blocks(domain, "heldout", tokenizer, count) for domain in EVAL_DOMAINS}


def run(eval_block_count: int, only: list[str] | None) -> None:
    base = base_model()
    folders = full_expert_folders()
    missing = [folder for folder in folders.values() if not (folder / "model.safetensors").is_file()]
    eval_blocks = _eval_blocks(base, eval_block_count)
    results = load_results()
    if results.get("eval_blocks") != eval_block_count:
        results = {"eval_blocks": eval_block_count, "dense": {}, "merges": {}}
    dense = {"base": base, **{f"{domain} full fine-tune": folder for domain, folder in folders.items()}}
    jobs: list[str | Variant] = [*dense, *variants()]
    shared_ok = supports_shared_weights()
    for job in jobs:
        name = job if isinstance(job, str) else job.name
        if only and not any(part in name for part in only):
            continue
        if (isinstance(job, Variant) and missing) or (
            isinstance(job, str) and name != "base" and dense[name] in missing
        ):
            print(f"{name}: skipped, {', '.join(map(str, missing))} missing (build_experts --full)", flush=True)
            continue
        if isinstance(job, Variant) and job.shared_weights and not shared_ok:
            print(f"{name}: skipped, this frankenmoe build has no `shared_weights` config block", flush=True)
            continue
        kind = "dense" if isinstance(job, str) else "merges"
        if results[kind].get(name, {}).get("depends_on") == depends_on(job):
            continue
        started = time.perf_counter()
        if isinstance(job, str):
            entry = {"depends_on": depends_on(job), **evaluate_folder(dense[name], eval_blocks)}
        else:
            out = MERGES / "full"
            try:
                merge_variant(job, base, folders, out)
            except FrankenMoEError as error:
                print(f"{name}: merge refused ({error})", flush=True)
                continue
            merge_seconds = time.perf_counter() - started
            entry = {
                "config": job.config(base, folders),
                "depends_on": depends_on(job),
                "merge_seconds": merge_seconds,
                **evaluate_folder(out, eval_blocks),
            }
            shutil.rmtree(out, ignore_errors=True)
        entry["seconds"] = time.perf_counter() - started
        results[kind][name] = entry
        save_results(results)
        print(f"{name}: {_summary(entry)} ({entry['seconds']:.0f} s)", flush=True)


def run_mergekit(eval_block_count: int = 16) -> None:
    """mergekit-moe on the same experts and keyword prompts, evaluated like the frankenmoe merges."""
    from benchmarks.quality import mergekit_reference

    base = base_model()
    folders = full_expert_folders()
    results = load_results()
    if results.get("eval_blocks") != eval_block_count:
        raise SystemExit("Run `python -m benchmarks.quality.full_finetunes` first (dense rows, same --eval-blocks).")
    if results["merges"].get(MERGEKIT_NAME, {}).get("depends_on") == depends_on(MERGEKIT_NAME):
        print(f"{MERGEKIT_NAME}: cached")
        return
    config = mergekit_reference.mergekit_config(base, folders, PROMPTS["keyword"])
    try:
        seconds = mergekit_reference.merge(config)
    except RuntimeError as error:
        results.setdefault("failures", {})[MERGEKIT_NAME] = str(error)
        save_results(results)
        raise SystemExit(f"{MERGEKIT_NAME} failed (recorded in {RESULTS}):\n{error}") from None
    started = time.perf_counter()
    entry = {"config": config, "depends_on": depends_on(MERGEKIT_NAME), "merge_seconds": seconds}
    entry.update(evaluate_folder(mergekit_reference.OUT, _eval_blocks(base, eval_block_count)))
    entry["seconds"] = seconds + time.perf_counter() - started
    results = load_results()  # again: a full_finetunes run may have added rows meanwhile
    results["merges"][MERGEKIT_NAME] = entry
    results.get("failures", {}).pop(MERGEKIT_NAME, None)
    save_results(results)
    print(f"{MERGEKIT_NAME}: {_summary(entry)} ({entry['seconds']:.0f} s)", flush=True)
    write_results(None, render_tables(results))


def _summary(entry: dict[str, Any]) -> str:
    return ", ".join(f"{domain} {entry[domain]['perplexity']:.3f}" for domain in EVAL_DOMAINS)


def _kept(base: float, merged: float, expert: float) -> str:
    """Gain kept, or "n/a" when the expert is no better than the base on its own domain (no gain to keep)."""
    if expert >= base:
        return "n/a"
    return f"{gain_retained(base, merged, expert):.0%}"


def render_tables(results: dict[str, Any]) -> str:
    """Markdown: the dense rows, then per merge perplexities, gain kept of each full fine-tune's own gain,
    prose against the base and routing shares."""
    dense = results.get("dense", {})
    if "base" not in dense:
        return "## Full fine-tunes\n\nNo results yet.\n"
    base = {domain: dense["base"][domain]["perplexity"] for domain in EVAL_DOMAINS}
    lines = [
        "## Full fine-tunes",
        "",
        f"Held-out blocks per domain: {results['eval_blocks']} (tokens scored: "
        + ", ".join(f"{domain} {dense['base'][domain]['tokens']}" for domain in EVAL_DOMAINS)
        + ").",
        "",
        "| model | " + " | ".join(f"{domain} ppl" for domain in EVAL_DOMAINS) + " | seconds to evaluate |",
        "|---|" + "---:|" * (len(EVAL_DOMAINS) + 1),
    ]
    for name, entry in dense.items():
        cells = [
            f"{entry[d]['perplexity']:.3f} ({relative_change(base[d], entry[d]['perplexity']):+.1%})"
            for d in EVAL_DOMAINS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry.get('seconds', 0):.0f} |")
    expert = {
        domain: dense[f"{domain} full fine-tune"][domain]["perplexity"]
        for domain in EXPERT_DOMAINS
        if f"{domain} full fine-tune" in dense
    }
    if len(expert) < len(EXPERT_DOMAINS):
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Gain kept = (ppl_base - ppl_merge) / (ppl_base - ppl_full_fine_tune) on the expert's own domain (n/a: "
        "that fine-tune is no better than the base there, so it has no gain to keep); prose = "
        "change against the base (negative is better). Routing: share of (token, layer) pairs whose top-1 expert "
        "is general / code / maths.",
        "",
        "| merge (experts, top-k | gate mode | prompts | shared weights) | "
        + " | ".join(f"{d} ppl" for d in EVAL_DOMAINS)
        + " | "
        + " | ".join(f"{d} gain kept" for d in EXPERT_DOMAINS)
        + " | prose vs base | routing on code | routing on maths | routing on prose | merge s | total s |",
        "|---|" + "---:|" * (len(EVAL_DOMAINS) + len(EXPERT_DOMAINS) + 1) + "---|---|---|---:|---:|",
    ]
    for name, entry in results.get("merges", {}).items():
        ppl = {domain: entry[domain]["perplexity"] for domain in EVAL_DOMAINS}
        kept = [_kept(base[d], ppl[d], expert[d]) for d in EXPERT_DOMAINS]
        shares = [" / ".join(f"{share:.2f}" for share in entry[d].get("top1_share", [])) for d in EVAL_DOMAINS]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{ppl[d]:.3f}" for d in EVAL_DOMAINS)
            + " | "
            + " | ".join(kept)
            + f" | {relative_change(base['prose'], ppl['prose']):+.1%} | "
            + " | ".join(shares)
            + f" | {entry.get('merge_seconds', 0):.0f} | {entry.get('seconds', 0):.0f} |"
        )
    for name, error in results.get("failures", {}).items():
        first_line = error.strip().splitlines()[-1] if error.strip() else "(no output)"
        lines += ["", f"{name}: failed: `{first_line}` (the whole error: benchmarks/.cache/quality/mergekit.log)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-blocks", type=int, default=16, help="Held-out 256-token blocks per domain.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="Run only jobs whose name contains one of these strings.")
    parser.add_argument("--table-only", action="store_true", help="Rewrite the results.md section from the cache.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.table_only:
        run(args.eval_blocks, args.only)
    write_results(None, render_tables(load_results()))
    print(render_tables(load_results()))


if __name__ == "__main__":
    main()
