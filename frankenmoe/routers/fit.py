"""gate_mode fit: per layer, a closed-form ridge regression from prompt tokens to expert labels.

Every content token of an expert's positive prompts is a training example whose target is that
expert's one-hot vector; every token of its negative prompts targets "any expert but this one"
(1/(experts-1) on the others, 0 on it). Each prompt weighs the same in total whatever its length,
and each expert's positive (and negative) prompts weigh one unit together, so a chatty expert
with long prompts does not pull the router towards itself. The solve is in float64 without a bias
(Mixtral's router has none; softmax ignores what every row shares anyway):

    W = (Xᵀ D X + λ I)⁻¹ Xᵀ D Y,   λ = ridge_lambda · trace(Xᵀ D X) / hidden_size

λ is relative to the mean eigenvalue of the weighted Gram matrix, so one ridge_lambda means the
same at every layer and in every model, and a handful of prompts (fewer tokens than dimensions)
still gives a well-posed, deterministic solve.

With fewer tokens N than dimensions H (the usual case: a few prompts and their continuations), the
same W is solved in its dual form, W = Aᵀ (A Aᵀ + λ I)⁻¹ D^½ Y with A = D^½ X: an N x N system
instead of an H x H one (for 350 tokens and H = 2048, about 30x fewer operations, 100x at H = 4096).
The two forms are the same regression; in float64 they agree far below the float32 rows' precision.

With `router.center`, X is first centred on its weighted mean token μ, and the rows lose their
component along μ. Without a bias, an uncentred fit spends the shared direction μ as one: it gives
each expert a fixed logit offset fitted to the prompts' tokens, which misroutes every token when
the tokens seen at inference sit elsewhere along μ.
"""

from __future__ import annotations

import torch

from frankenmoe.routers.hidden import LayerStates, layerwise_gates
from frankenmoe.routers.prompts import ExpertPrompts, without_component
from frankenmoe.routers.request import GateRequest, Gates


def fit_gates(request: GateRequest) -> Gates:
    return layerwise_gates(request, fit_rows)


def fit_rows(states: LayerStates, prompts: ExpertPrompts, request: GateRequest) -> torch.Tensor:
    expert_count = len(prompts.positive)
    inputs = states.selected(request.router.input)
    features: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    for expert, (positive, negative) in enumerate(zip(prompts.positive, prompts.negative, strict=True)):
        one_hot = torch.zeros(expert_count, dtype=torch.float64)
        one_hot[expert] = 1.0
        others = (1.0 - one_hot) / max(expert_count - 1, 1)
        for indices, target in ((positive, one_hot), (negative, others)):
            for index in indices:
                tokens = inputs[index][prompts.prompts[index].content_mask.to(inputs[index].device)]
                tokens = tokens.detach().cpu().double()
                features.append(tokens)
                targets.append(target.expand(len(tokens), -1))
                weights.append(torch.full((len(tokens),), 1.0 / (len(tokens) * len(indices)), dtype=torch.float64))
    x = torch.cat(features)
    y = torch.cat(targets)
    w = torch.cat(weights).unsqueeze(1)
    mean_token = (w * x).sum(dim=0) / w.sum() if request.router.center else None
    if mean_token is not None:
        # Targets need no centring: the centred X is orthogonal (under D) to any constant column.
        x = x - mean_token
    solution = ridge_solution(x, y, w, request.router.ridge_lambda)
    rows = solution.T if mean_token is None else without_component(solution.T, mean_token)
    return rows.float()


def ridge_solution(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
    """W [H, E] = (Xᵀ D X + λ I)⁻¹ Xᵀ D Y for X [N, H], Y [N, E], D = diag(w [N, 1]), float64; the dual
    form when N < H (see the module docstring)."""
    tokens, dimensions = x.shape
    if tokens >= dimensions:
        gram = x.T @ (w * x)
        ridge = ridge_lambda * torch.trace(gram) / dimensions
        return torch.linalg.solve(gram + ridge * torch.eye(dimensions, dtype=torch.float64), x.T @ (w * y))
    roots = w.sqrt()
    a = roots * x
    kernel = a @ a.T
    ridge = ridge_lambda * torch.trace(kernel) / dimensions  # trace(A Aᵀ) = trace(Aᵀ A) = trace(Xᵀ D X)
    return a.T @ torch.linalg.solve(kernel + ridge * torch.eye(tokens, dtype=torch.float64), roots * y)
