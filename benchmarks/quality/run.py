"""The merge-quality benchmark: how much of each expert's held-out perplexity gain a frankenmoe merge keeps.

    .venv/bin/python -m benchmarks.quality.build_experts      # once (see README for the time)
    .venv/bin/python -m benchmarks.quality.run --threads 1 --worker 0/2 &
    .venv/bin/python -m benchmarks.quality.run --threads 1 --worker 1/2
    .venv/bin/python -m benchmarks.quality.run --table-only

Evaluates the base, each expert and a grid of merges (expert set x gate mode x prompt kind, then
router options) on held-out code, maths and prose (the control no expert trained on). Results are
kept per variant in benchmarks/.cache/quality/results-*.json, so an interrupted run resumes; each
records the expert settings and router defaults it was computed from, and stale ones are redone. The
tables go to benchmarks/quality/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer

import frankenmoe
from benchmarks.quality.domains import CACHE, EVAL_DOMAINS, EXPERT_DOMAINS, EXPERTS, base_model, blocks
from benchmarks.quality.evaluate import gain_retained, relative_change
from benchmarks.quality.training import TRAINING_LOG
from frankenmoe.analysis.perplexity import score_folder
from frankenmoe.analysis.windows import TokenWindows
from frankenmoe.config.constants import GATE_MODES, PROMPT_GATE_MODES
from frankenmoe.config.parse import parse_config
from frankenmoe.config.schema import RouterConfig
from frankenmoe.errors import FrankenMoEError
from frankenmoe.routers import GATE_FUNCTIONS

RESULTS_TABLE = Path(__file__).resolve().parent / "results.md"
FULL_SECTION_MARKER = "<!-- full fine-tunes (written by benchmarks.quality.full_finetunes) -->"
MERGES = CACHE / "merges"

PROMPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "keyword": {
        "general": ("chat", "conversation", "story", "history", "advice", "explain"),
        "code": ("python", "code", "programming", "function", "class", "import"),
        "maths": ("math", "arithmetic", "word problem", "calculate", "solve", "answer"),
    },
    "sentence": {
        "general": (
            "Tell me about the history of the printing press.",
            "Can you recommend a good book to read this summer?",
            "Explain why the sky looks blue during the day.",
            "What should I pack for a weekend trip to the mountains?",
        ),
        "code": (
            "Write a Python function that reads a text file and returns a list of its lines.",
            "Fix the bug in this Python class so that its methods return the right values.",
            "How do I use a dictionary comprehension in Python?",
            "Implement a command-line tool in Python that parses its arguments with argparse.",
        ),
        "maths": (
            "Sam has 14 oranges and buys 3 bags with 6 oranges each. How many oranges does Sam have now?",
            "A bus travels at 50 km per hour for 4 hours. How far does it go?",
            "A shirt costs $40 and is 25% off. What is the sale price?",
            "Solve this word problem step by step and give the final answer.",
        ),
    },
}
EXPERT_SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "base+code+maths top-2": (("general", "code", "maths"), 2),
    "code+maths top-1": (("code", "maths"), 1),
    "code+maths top-2": (("code", "maths"), 2),
}
MAIN_SET = "base+code+maths top-2"
ROUTER_SWEEP: tuple[dict[str, Any], ...] = (
    {"sequential": True},
    {"pooling": "last"},
    {"logit_std": 0.5},
    {"logit_std": 2.0},
    {"logit_std": 4.0},
    {"input": "residual"},
    {"center": False},
    {"lead_in": False},
    {"continuation_tokens": 0},
    {"continuation_tokens": 32},
)


@dataclass(frozen=True)
class Variant:
    name: str
    expert_set: str
    gate_mode: str
    prompt_kind: str | None
    router: dict[str, Any] = field(default_factory=dict)
    shared_weights: dict[str, Any] = field(default_factory=dict)
    """The config's `shared_weights` block (how the non-expert tensors are made); empty: frankenmoe's default."""

    def config(self, base: Path, expert_folders: dict[str, Path]) -> dict[str, Any]:
        """The merge config; the "general" expert is the base model itself."""
        domains, top_k = EXPERT_SETS[self.expert_set]
        experts = []
        for domain in domains:
            entry: dict[str, Any] = {"source_model": str(base if domain == "general" else expert_folders[domain])}
            if self.prompt_kind is not None:
                entry["positive_prompts"] = list(PROMPTS[self.prompt_kind][domain])
            experts.append(entry)
        config: dict[str, Any] = {
            "base_model": str(base),
            "gate_mode": self.gate_mode,
            "experts_per_token": top_k,
            "experts": experts,
        }
        if self.router:
            config["router"] = dict(self.router)
        if self.shared_weights:
            config["shared_weights"] = dict(self.shared_weights)
        return config

    def resolved_router(self) -> RouterConfig:
        """The router settings a merge of this variant runs with, defaults (per gate mode) filled in."""
        placeholders = {domain: Path(domain) for domain in EXPERT_DOMAINS}
        return parse_config(yaml.safe_dump(self.config(Path("base"), placeholders)), self.name).router


def available_gate_modes() -> list[str]:
    """Every gate mode this frankenmoe build implements (the list grows as modes are added)."""
    return [mode for mode in GATE_MODES if mode in GATE_FUNCTIONS]


def variants(prompt_modes: list[str], free_modes: list[str]) -> list[Variant]:
    """Most informative first, so a run cut short still answers the main questions: every gate mode
    on the main set with keyword prompts, the same with sentence prompts, the experts alone with
    keyword prompts, router options, and last the experts alone with sentence prompts."""

    def grid(expert_set: str, kind: str) -> list[Variant]:
        return [Variant(f"{expert_set} | {mode} | {kind}", expert_set, mode, kind) for mode in prompt_modes]

    def prompt_free(expert_set: str) -> list[Variant]:
        return [Variant(f"{expert_set} | {mode}", expert_set, mode, None) for mode in free_modes]

    other_sets = [name for name in EXPERT_SETS if name != MAIN_SET]
    chosen = [*grid(MAIN_SET, "keyword"), *prompt_free(MAIN_SET), *grid(MAIN_SET, "sentence")]
    for expert_set in other_sets:
        chosen += grid(expert_set, "keyword")
    for mode in prompt_modes:
        if mode == "cheap_embed":
            continue
        default = Variant("", MAIN_SET, mode, "keyword").resolved_router()
        for router in ROUTER_SWEEP:
            if mode == "fit" and "pooling" in router:
                continue  # fit regresses on every prompt token; pooling does not enter it
            options = ", ".join(f"{key}={value}" for key, value in router.items())
            variant = Variant(f"{MAIN_SET} | {mode} | keyword | {options}", MAIN_SET, mode, "keyword", router)
            if variant.resolved_router() != default:  # a sweep value equal to the mode's default repeats its row
                chosen.append(variant)
    for expert_set in other_sets:
        chosen += [*grid(expert_set, "sentence"), *prompt_free(expert_set)]
    return chosen


def merge_variant(variant: Variant, base: Path, expert_folders: dict[str, Path], out: Path) -> None:
    """Merge through the public API, exactly as `frankenmoe merge CONFIG OUT --force` does."""
    out.parent.mkdir(parents=True, exist_ok=True)
    frankenmoe.merge(variant.config(base, expert_folders), out, force=True)


def evaluate_folder(folder: Path, eval_blocks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Perplexity of every next token of each domain's blocks and, for a MoE, the top-1 share of (token,
    layer) pairs: frankenmoe's own streamed evaluator (`frankenmoe eval`), each block scored whole."""
    scores = score_folder(folder, {domain: TokenWindows.whole(blocks) for domain, blocks in eval_blocks.items()})
    result: dict[str, Any] = {}
    for domain, score in scores.items():
        result[domain] = {"perplexity": score.perplexity, "tokens": score.tokens}
        if score.top1_share is not None:
            result[domain]["top1_share"] = list(score.top1_share)
    return result


def expert_settings(domain: str) -> dict[str, Any]:
    """The training settings of the cached expert (its identity for the results cache)."""
    return json.loads((EXPERTS / domain / TRAINING_LOG).read_text())["settings"]


def depends_on(job: str | Variant) -> dict[str, Any]:
    """What a cached result was computed from: the experts' training settings and, for a merge, the
    router settings it runs with in this frankenmoe build (its own options, the defaults filled in).
    A result whose record differs is stale and is redone."""
    if isinstance(job, str):
        return {} if job == "base" else {"expert": expert_settings(job.removesuffix(" expert"))}
    domains = [domain for domain in EXPERT_SETS[job.expert_set][0] if domain in EXPERT_DOMAINS]
    return {
        "experts": {domain: expert_settings(domain) for domain in domains},
        "router": asdict(job.resolved_router()),
    }


def is_current(name: str, entry: dict[str, Any]) -> bool:
    """Whether a cached entry matches today's experts and router defaults (unknown names count as stale)."""
    if name in ("base", *(f"{domain} expert" for domain in EXPERT_DOMAINS)):
        return entry.get("depends_on", {}) == depends_on(name)
    variant = next((job for job in variants(*_mode_split(available_gate_modes())) if job.name == name), None)
    return variant is not None and entry.get("depends_on") == depends_on(variant)


def _mode_split(modes: list[str]) -> tuple[list[str], list[str]]:
    """(prompt-based modes, prompt-free modes)."""
    prompt_modes = [mode for mode in modes if mode in PROMPT_GATE_MODES]
    return prompt_modes, [mode for mode in modes if mode not in PROMPT_GATE_MODES]


def results_file(worker: int) -> Path:
    return CACHE / f"results-{worker}.json"


def load_results(eval_block_count: int | None = None) -> dict[str, Any]:
    """Every worker's current results merged (see `is_current`); only those scored on `eval_block_count`
    blocks (default: the newest run's)."""
    files = sorted(CACHE.glob("results-*.json"))
    loaded = [json.loads(path.read_text()) for path in files]
    if eval_block_count is None and loaded:
        newest = max(zip(files, loaded, strict=True), key=lambda pair: pair[0].stat().st_mtime)
        eval_block_count = newest[1]["eval_blocks"]
    merged: dict[str, Any] = {"eval_blocks": eval_block_count, "gate_modes": [], "dense": {}, "merges": {}}
    for results in loaded:
        if results["eval_blocks"] == eval_block_count:
            merged["gate_modes"] = results["gate_modes"]
            for kind in ("dense", "merges"):
                merged[kind].update({name: entry for name, entry in results[kind].items() if is_current(name, entry)})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-blocks", type=int, default=16, help="Held-out 256-token blocks per domain.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="Run only variants whose name contains one of these strings.")
    parser.add_argument(
        "--worker",
        type=lambda text: tuple(int(part) for part in text.split("/")),
        default=(0, 1),
        help="I/N: run every N-th job starting at the I-th, so N processes (1 thread each) share the work.",
    )
    parser.add_argument("--table-only", action="store_true", help="Rewrite results.md from cached results.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # frankenmoe's slice workers, in the evaluation too
    if not args.table_only:
        run(args.eval_blocks, args.only, *args.worker)
    write_results(render_tables(load_results()), None)
    print(RESULTS_TABLE.read_text())


def write_results(mlp_tables: str | None, full_tables: str | None) -> None:
    """Rewrite results.md: the MLP-only grid, then the full fine-tune section after its marker. None
    keeps that part as it is in the file (each benchmark rewrites only its own part)."""
    old = RESULTS_TABLE.read_text() if RESULTS_TABLE.is_file() else ""
    old_mlp, _, old_full = old.partition(FULL_SECTION_MARKER)
    mlp = old_mlp.rstrip("\n") + "\n" if mlp_tables is None else mlp_tables
    full = old_full.strip("\n") + "\n" if full_tables is None else full_tables
    text = mlp if not full.strip() else f"{mlp}\n{FULL_SECTION_MARKER}\n\n{full}"
    RESULTS_TABLE.write_text(text)


def run(eval_block_count: int, only: list[str] | None, worker: int, workers: int) -> None:
    base = base_model()
    for domain in EXPERT_DOMAINS:
        if not (EXPERTS / domain / "model.safetensors").is_file():
            raise SystemExit(f"The {domain} expert is missing: run `python -m benchmarks.quality.build_experts` first.")
    tokenizer = AutoTokenizer.from_pretrained(base)
    eval_blocks = {domain: blocks(domain, "heldout", tokenizer, eval_block_count) for domain in EVAL_DOMAINS}
    done = load_results(eval_block_count)
    modes = available_gate_modes()
    own_file = results_file(worker)
    mine = json.loads(own_file.read_text()) if own_file.is_file() else {}
    if mine.get("eval_blocks") != eval_block_count:
        mine = {"eval_blocks": eval_block_count, "dense": {}, "merges": {}}
    mine["gate_modes"] = modes

    expert_folders = {domain: EXPERTS / domain for domain in EXPERT_DOMAINS}
    dense = {"base": base, **{f"{domain} expert": folder for domain, folder in expert_folders.items()}}
    jobs: list[str | Variant] = [*dense, *variants(*_mode_split(modes))]
    for index, job in enumerate(jobs):
        name = job if isinstance(job, str) else job.name
        if index % workers != worker or name in done["dense"] or name in done["merges"]:
            continue
        if only and not any(part in name for part in only):
            continue
        started = time.perf_counter()
        if isinstance(job, str):
            mine["dense"][name] = entry = {"depends_on": depends_on(job), **evaluate_folder(dense[name], eval_blocks)}
        else:
            out = MERGES / f"worker-{worker}"
            try:
                merge_variant(job, base, expert_folders, out)
            except FrankenMoEError as error:
                print(f"{name}: merge refused ({error})", flush=True)
                continue
            entry = {
                "config": job.config(base, expert_folders),
                "depends_on": depends_on(job),
                **evaluate_folder(out, eval_blocks),
            }
            shutil.rmtree(out, ignore_errors=True)
            mine["merges"][name] = entry
        own_file.parent.mkdir(parents=True, exist_ok=True)
        own_file.write_text(json.dumps(mine, indent=1) + "\n")
        print(f"{name}: {_summary(entry)} ({time.perf_counter() - started:.0f} s)", flush=True)


def _summary(entry: dict[str, Any]) -> str:
    return ", ".join(f"{domain} {entry[domain]['perplexity']:.3f}" for domain in EVAL_DOMAINS)


def render_tables(results: dict[str, Any]) -> str:
    """Markdown: dense perplexities, then per merge the perplexities, gain retained and routing shares."""
    if not results.get("dense"):
        return "No results yet.\n"
    dense = results["dense"]
    base = {domain: dense["base"][domain]["perplexity"] for domain in EVAL_DOMAINS}
    tokens = {domain: dense["base"][domain]["tokens"] for domain in EVAL_DOMAINS}
    lines = [
        f"Held-out tokens scored per domain: {', '.join(f'{d} {tokens[d]}' for d in EVAL_DOMAINS)}.",
        f"Gate modes implemented at run time: {', '.join(results.get('gate_modes', []))}.",
        "",
        "| model | " + " | ".join(f"{d} ppl" for d in EVAL_DOMAINS) + " |",
        "|---|" + "---:|" * len(EVAL_DOMAINS),
    ]
    for name, entry in dense.items():
        cells = [
            f"{entry[d]['perplexity']:.3f} ({relative_change(base[d], entry[d]['perplexity']):+.1%})"
            for d in EVAL_DOMAINS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    expert = {domain: dense[f"{domain} expert"][domain]["perplexity"] for domain in EXPERT_DOMAINS}
    lines += [
        "",
        "Gain retained = (ppl_base - ppl_moe) / (ppl_base - ppl_expert) on the expert's own held-out domain; "
        "prose = change against the base on the control text (negative is better). Routing: share of "
        "(token, layer) pairs whose top-1 expert is each expert, on each domain's held-out text, experts in "
        "the set's order.",
        "",
        "| merge (experts, top-k | gate mode | prompts | router) | "
        + " | ".join(f"{d} ppl" for d in EVAL_DOMAINS)
        + " | "
        + " | ".join(f"{d} gain kept" for d in EXPERT_DOMAINS)
        + " | prose vs base | routing on code | routing on maths | routing on prose |",
        "|---|" + "---:|" * (len(EVAL_DOMAINS) + len(EXPERT_DOMAINS) + 1) + "---|---|---|",
    ]
    for name, entry in sorted(results.get("merges", {}).items()):
        ppl = {domain: entry[domain]["perplexity"] for domain in EVAL_DOMAINS}
        kept = [f"{gain_retained(base[d], ppl[d], expert[d]):.0%}" for d in EXPERT_DOMAINS]
        shares = [" / ".join(f"{share:.2f}" for share in entry[d]["top1_share"]) for d in EVAL_DOMAINS]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{ppl[d]:.3f}" for d in EVAL_DOMAINS)
            + " | "
            + " | ".join(kept)
            + f" | {relative_change(base['prose'], ppl['prose']):+.1%} | "
            + " | ".join(shares)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
