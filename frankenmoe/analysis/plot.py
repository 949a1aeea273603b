"""The routing heatmap picture, drawn with matplotlib (the optional `plot` extra).

Only the object-oriented Figure API is used, never pyplot, so drawing needs no display and leaves
no global matplotlib state behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from frankenmoe.analysis.routing import PromptRouting
from frankenmoe.analysis.routing_stats import RoutingSummary, content_probabilities, content_texts
from frankenmoe.errors import FrankenMoEError, OutputError

MAX_FIGURE_INCHES = 40.0
"""Past this width, long prompts shrink their token columns instead of growing the picture."""
MAX_ANNOTATED_CELLS = 512
"""Utilisation cells get their percentage written in them up to this many cells (beyond, it is unreadable)."""


def require_matplotlib() -> ModuleType:
    """matplotlib, or an error that says how to install it; checked before any slow work starts."""
    try:
        import matplotlib
    except ImportError:
        raise FrankenMoEError(
            "--png needs matplotlib, which is an optional extra of frankenmoe. Install it with "
            "`pip install 'frankenmoe[plot]'` (or `pip install matplotlib`), or leave out --png."
        ) from None
    return matplotlib


def write_routing_heatmap(
    path: Path, routings: Sequence[PromptRouting], summary: RoutingSummary, expert_names: Sequence[str]
) -> None:
    """A PNG with the layers x experts utilisation and one layer x token top-1 grid per prompt."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    layers, experts = summary.utilisation.shape
    longest = max(int(routing.prompt.content_mask.sum()) for routing in routings)
    width = min(MAX_FIGURE_INCHES, max(8.0, 2.5 + 0.32 * max(longest, experts)))
    layer_height = 0.22 * layers + 1.6
    figure = Figure(figsize=(width, layer_height * (1 + len(routings))), layout="constrained")
    axes = figure.subplots(1 + len(routings), 1, squeeze=False)[:, 0]

    image = axes[0].imshow(summary.utilisation.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes[0].set_title("Expert utilisation per layer (share of tokens routed first to each expert)")
    axes[0].set_xlabel("expert")
    axes[0].set_ylabel("layer")
    axes[0].set_xticks(range(experts), [_short(name) for name in expert_names], rotation=30, ha="right")
    layer_ticks = range(0, layers, max(1, layers // 16))
    axes[0].set_yticks(layer_ticks)
    if layers * experts <= MAX_ANNOTATED_CELLS:
        for layer in range(layers):
            for expert in range(experts):
                share = float(summary.utilisation[layer, expert])
                colour = "black" if share > 0.6 else "white"
                axes[0].text(expert, layer, f"{share:.0%}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes[0], label="share of tokens")

    # One distinct colour per expert, so the same colour means the same expert in every grid.
    qualitative = colormaps["tab10" if experts <= 10 else "tab20"]
    palette = ListedColormap([qualitative(expert % qualitative.N) for expert in range(experts)])
    norm = BoundaryNorm([value - 0.5 for value in range(experts + 1)], experts)
    for axis, routing in zip(axes[1:], routings, strict=True):
        top = content_probabilities(routing).argmax(dim=-1).numpy()
        grid = axis.imshow(top, aspect="auto", cmap=palette, norm=norm, interpolation="nearest")
        tokens = content_texts(routing)
        axis.set_title(f"Top-1 expert per token: {_short(routing.prompt.text, 60)!r}", fontsize=9)
        axis.set_ylabel("layer")
        axis.set_yticks(layer_ticks)
        step = max(1, len(tokens) // 60)
        axis.set_xticks(range(0, len(tokens), step), tokens[::step], rotation=60, ha="right", fontsize=7)
        figure.colorbar(grid, ax=axis, ticks=range(experts), label="expert")
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise OutputError(f"Writing the picture {path} failed: {error.strerror or error}.") from None


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
