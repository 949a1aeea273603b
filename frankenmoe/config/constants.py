"""The merge config's fixed choices and limits: gate modes, dtypes, trunk methods, router and laser options.

frankenmoe.config.schema's dataclasses document them as YAML keys, frankenmoe.config.parse checks values against
them, and the routers, the plan and the API read them.
"""

from __future__ import annotations

from frankenmoe.architectures.roles import ATTENTION_PROJECTIONS, MLP_PARTS

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "fit")
DEFAULT_GATE_MODE = "fit"
"""The gate mode of a config that names none. mergekit-moe's default is `hidden`, which a config that
names it still gets; `fit` routes held-out prompts far better (benchmarks/routing) and, with text
generation in bfloat16 where the CPU has bfloat16 units, costs at most about twice `hidden` at 7B
(benchmarks/README.md, issue 28)."""
PROMPT_GATE_MODES = frozenset({"hidden", "cheap_embed", "fit"})
CONTINUING_GATE_MODES = frozenset({"hidden", "fit"})
AUTO_CONTINUATION_TOKENS = {"fit": 32}
"""router.continuation_tokens when the config says `auto` or nothing: per gate mode, 0 when absent.
Chosen by benchmarks/routing (fit gains most with keyword prompts; hidden's mean rows get worse)."""
MAX_CONTINUATION_TOKENS = 1024
DTYPES = ("bfloat16", "float16", "float32")
TRUNK_METHODS = ("base", "linear", "task_arithmetic", "dare_linear", "dare_ties")
"""`shared_weights.method`: how the non-expert tensors are made (formulas in frankenmoe.sources.trunk)."""
TRUNK_METHOD_KEYS = {
    "base": (),
    "linear": ("weights", "base_weight", "normalize"),
    "task_arithmetic": ("weights", "lambda"),
    "dare_linear": ("weights", "lambda", "density"),
    "dare_ties": ("weights", "lambda", "density", "normalize"),
}
"""The `shared_weights` keys (besides `method`) that each method's formula reads; any other is refused."""
MAX_LINEAR_AMPLIFICATION = 100.0
"""linear with normalize divides every weight by their sum S: (|b| + Σ|wᵢ|) / |S| is how much a 1% change
of one weight changes the result, relative to the deltas. Above 100, a 1% change of a weight can change
the merged tensors by more than the deltas themselves: the result is set by the cancellation in S."""
POOLINGS = ("mean", "last")
ROUTER_INPUTS = ("router", "residual")
LASER_METHODS = ("snr", "fixed", "optimal")
LASER_LAYER_WORDS = ("all", "last_half")
MAX_LASER_RANGE = 10_000
EXPERT_LASER_MATRICES = {"mlp": MLP_PARTS}
BASE_LASER_MATRICES = {"attention": tuple(ATTENTION_PROJECTIONS)}
