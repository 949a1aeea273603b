"""Routing-quality benchmark: how well each gate mode sends held-out prompts to the right expert.

    python benchmarks/routing/run_routing_bench.py [--sets keywords sentences] [--variants NAME ...]

The model is SmolLM2-135M-Instruct (examples/smollm2.py converts it once), merged into a 4-expert
MoE whose experts are all that same model, so routing is the only thing that differs between
variants. The labelled prompts are eval_prompts.yaml (chat, code, story, maths: experts 0-3);
the positive prompts are prompt_sets.yaml. Accuracy, utilisation and entropy come from
frankenmoe.analysis.routing_stats, the same functions `frankenmoe route` uses (chance is 25%).

Every variant computes its routers with frankenmoe's public API (plan_merge, then compute_routers:
what a merge writes, cast to the output dtype). Because the experts are
identical, the MoE's hidden states do not depend on the routers (the top-k weights sum to one over
copies of one MLP), so the evaluation prompts' router inputs are computed once, layer by layer, and
each variant's router probabilities are softmax(router_input @ gate rows) of those, exactly what
Mixtral computes. `--full-route` instead writes each variant's routers into a real merged
checkpoint and runs frankenmoe.analysis.routing.route_prompts on it (slow on 2 cores; it agrees).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from smollm2 import ensure_smollm2  # noqa: E402

import frankenmoe  # noqa: E402
from frankenmoe.analysis.routing import PromptRouting, route_prompts  # noqa: E402
from frankenmoe.analysis.routing_stats import routing_accuracy, summarise_routing  # noqa: E402
from frankenmoe.checkpoint.folder import Checkpoint, load_checkpoint  # noqa: E402
from frankenmoe.decoder.decoder import StreamedDecoder, router_inputs_by_layer  # noqa: E402
from frankenmoe.io.safetensors import read_header  # noqa: E402
from frankenmoe.routers.prompts import EncodedPrompt, encode_prompts  # noqa: E402
from frankenmoe.sources.model import load_source  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = ROOT / "benchmarks" / ".cache" / "routing"
DOMAINS = ("chat", "code", "story", "math")
OUTPUT_DTYPE = "bfloat16"
OUTPUT_TORCH_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Variant:
    name: str
    gate_mode: str | None
    """None: the config names no gate_mode, so the default runs."""
    router: dict[str, Any] = field(default_factory=dict)
    float32_generation: bool = False
    """Generate continuations with float32 products even where the CPU multiplies bfloat16 (as before issue 28)."""


VARIANTS = (
    Variant("random", "random"),
    Variant("cheap_embed", "cheap_embed"),
    Variant(
        "hidden mergekit (residual, last, unit rows, no centring, no lead-in)",
        "hidden",
        {"input": "residual", "pooling": "last", "scale": 1.0, "center": False, "lead_in": False},
    ),
    Variant("hidden mean, auto, no centring, no lead-in", "hidden", {"center": False, "lead_in": False}),
    Variant("hidden mean, auto, lead-in only", "hidden", {"center": False}),
    Variant("hidden mean, auto, centred + lead-in (default hidden)", "hidden", {}),
    Variant("hidden mean, auto logit_std 2, centred + lead-in", "hidden", {"logit_std": 2.0}),
    Variant("hidden, continuation 32", "hidden", {"continuation_tokens": 32}),
    Variant(
        "fit, no centring, no lead-in, no continuation",
        "fit",
        {"center": False, "lead_in": False, "continuation_tokens": 0},
    ),
    Variant("fit, centred + lead-in, no continuation", "fit", {"continuation_tokens": 0}),
    Variant("fit, continuation 8", "fit", {"continuation_tokens": 8}),
    Variant("fit, continuation 16", "fit", {"continuation_tokens": 16}),
    Variant("fit, continuation 32 (default fit)", "fit", {}),
    Variant("fit, continuation 64", "fit", {"continuation_tokens": 64}),
    Variant("fit, continuation 32, no centring, no lead-in", "fit", {"center": False, "lead_in": False}),
    Variant("fit, continuation 32, logit_std 2", "fit", {"logit_std": 2.0}),
    Variant("fit, continuation 32, lambda 1", "fit", {"ridge_lambda": 1.0}),
    Variant("fit, continuation 32, float32 generation (before issue 28)", "fit", {}, float32_generation=True),
    Variant("fit, continuation 16, float32 generation (before issue 28)", "fit", {"continuation_tokens": 16}, True),
    Variant("no gate_mode (the default)", None),
)


def config_text(model: Path, prompts: dict[str, list[str]], variant: Variant) -> str:
    data: dict[str, Any] = {
        "base_model": str(model),
        **({} if variant.gate_mode is None else {"gate_mode": variant.gate_mode}),
        "dtype": OUTPUT_DTYPE,
        "experts_per_token": 2,
        "experts": [{"source_model": str(model), "positive_prompts": prompts[domain]} for domain in DOMAINS],
    }
    if variant.router:
        data["router"] = variant.router
    return yaml.safe_dump(data, sort_keys=False)


def variant_gates(model: Path, prompts: dict[str, list[str]], variant: Variant, work: Path) -> torch.Tensor:
    """The routers a merge with this variant's config writes (as execute_merge computes them)."""
    prepared = frankenmoe.plan_merge(config_text(model, prompts, variant), work / "unused-output", force=True)
    if not variant.float32_generation:
        return frankenmoe.compute_routers(prepared).router.to(OUTPUT_TORCH_DTYPE)
    # The merge decides bfloat16 products from the CPU alone; the "before" rows pretend it has no bfloat16 units.
    with mock.patch("frankenmoe.merging.prepare.cpu_multiplies_bfloat16", return_value=False):
        return frankenmoe.compute_routers(prepared).router.to(OUTPUT_TORCH_DTYPE)


def shared_checkpoint(model: Path, prompts: dict[str, list[str]]) -> Checkpoint:
    """One full merge (written once, cached): every tensor but the routers is the same in all variants."""
    out = CACHE / "smollm2-4x"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        frankenmoe.merge(config_text(model, prompts, Variant("random", "random")), out, force=True)
    return load_checkpoint(out)


def with_routers(checkpoint: Checkpoint, gates: torch.Tensor, file: Path) -> Checkpoint:
    routers = {
        checkpoint.layout.router_name(layer): gates[layer].contiguous() for layer in range(checkpoint.num_layers)
    }
    save_file(routers, str(file))
    return replace(checkpoint, tensors={**checkpoint.tensors, **read_header(file)})


@dataclass(frozen=True)
class EvaluationStates:
    prompts: list[EncodedPrompt]
    router_inputs: list[list[torch.Tensor]]
    """[layer][prompt] -> [tokens, hidden]: what every router of the merged model sees."""


def evaluation_states(model: Path, texts: list[str]) -> EvaluationStates:
    source = load_source(str(model))
    prompts = encode_prompts(source.path, source.config, texts)
    decoder = StreamedDecoder(source.config, source.tensors)
    sequences = [prompt.token_ids for prompt in prompts]
    return EvaluationStates(prompts, [inputs for _, inputs in router_inputs_by_layer(decoder, sequences)])


def routings_from_states(states: EvaluationStates, gates: torch.Tensor) -> list[PromptRouting]:
    rows = gates.float()
    return [
        PromptRouting(
            prompt=prompt,
            tokens=(),
            probabilities=torch.stack(
                [
                    torch.softmax(layer_inputs[index] @ rows[layer].T, dim=-1)
                    for layer, layer_inputs in enumerate(states.router_inputs)
                ]
            ),
        )
        for index, prompt in enumerate(states.prompts)
    ]


def evaluate(routings: list[PromptRouting], labels: list[int]) -> dict[str, Any]:
    accuracy = routing_accuracy(routings, labels)
    summary = summarise_routing(routings)
    return {
        "prompt_accuracy": accuracy.prompt_accuracy,
        "token_accuracy": accuracy.token_accuracy,
        "prompt_accuracy_by_domain": {DOMAINS[k]: v for k, v in accuracy.prompt_accuracy_by_expert.items()},
        "token_accuracy_by_domain": {DOMAINS[k]: v for k, v in accuracy.token_accuracy_by_expert.items()},
        "mean_entropy": summary.mean_entropy,
        "max_layer_share": float(summary.utilisation.max()),
        "utilisation": [round(float(value), 3) for value in summary.overall_utilisation],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| prompts | variant | prompt acc | token acc | prompt acc chat/code/story/math | entropy (nats) | max layer share | utilisation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        by_domain = "/".join(f"{row['prompt_accuracy_by_domain'][domain]:.2f}" for domain in DOMAINS)
        lines.append(
            f"| {row['prompts']} | {row['variant']} | {row['prompt_accuracy']:.2f} | {row['token_accuracy']:.2f} | "
            f"{by_domain} | {row['mean_entropy']:.3f} | {row['max_layer_share']:.2f} | "
            f"{' '.join(f'{share:.2f}' for share in row['utilisation'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["keywords", "sentences"], help="Positive prompt sets to use.")
    parser.add_argument("--variants", nargs="+", help="Only variants whose name contains one of these strings.")
    parser.add_argument("--full-route", action="store_true", help="Route through a written checkpoint (slow).")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ensure_smollm2()
    evaluation = yaml.safe_load((HERE / "eval_prompts.yaml").read_text())
    texts = [text for domain in DOMAINS for text in evaluation[domain]]
    labels = [index for index, domain in enumerate(DOMAINS) for _ in evaluation[domain]]
    prompt_sets = yaml.safe_load((HERE / "prompt_sets.yaml").read_text())
    variants = [v for v in VARIANTS if not args.variants or any(part in v.name for part in args.variants)]

    checkpoint = shared_checkpoint(model, prompt_sets["keywords"]) if args.full_route else None
    states = None if args.full_route else evaluation_states(model, texts)
    results = []
    for set_name in args.sets:
        for number, variant in enumerate(variants):
            work = CACHE / "variants" / f"{set_name}-{number}"
            work.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            gates = variant_gates(model, prompt_sets[set_name], variant, work)
            if checkpoint is not None:
                routings = route_prompts(with_routers(checkpoint, gates, work / "routers.safetensors"), texts)
            else:
                routings = routings_from_states(states, gates)
            row = {"prompts": set_name, "variant": variant.name, **evaluate(routings, labels)}
            row["seconds"] = round(time.perf_counter() - started, 1)
            results.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(f"\n{date.today()} on {platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)")
    print(table(results))
    (CACHE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
