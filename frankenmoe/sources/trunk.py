"""A merged shared trunk: the non-expert tensors (attention, norms, embeddings, head) made from the base
and the experts instead of the base alone, tensor by tensor while streaming.

With deltas d_i = W_i - W_base of the experts (weights w_i, scale λ = `lambda`):

    linear           W = (b·W_base + Σ w_i W_i) / (b + Σ w_i)      (without `normalize`: not divided)
    task_arithmetic  W = W_base + λ Σ w_i d_i
    dare_linear      W = W_base + λ Σ w_i m_i ⊙ d_i / p             m_i ~ Bernoulli(p = density), seeded
    dare_ties        as dare_linear, but each element keeps only the deltas whose sign agrees with
                     the sign of Σ w_i m_i ⊙ d_i, and (with `normalize`) divides by those deltas' weights

Every formula is elementwise, so any block of rows is computed from the same rows of each source:
memory stays at a few row blocks whatever the tensor's size, and the hidden-state pass can read
the merged rows it needs (one layer's attention, the embedding rows of the prompts' tokens) without
the merged model ever being written out. Computed in float32, cast by the writer. DARE's drop mask
is seeded per tensor, expert and block of MASK_BLOCK_ROWS rows, so it does not depend on how the
rows are requested.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from frankenmoe.io.safetensors import TensorLocation, read_rows

DARE_METHODS = frozenset({"dare_linear", "dare_ties"})
MASK_BLOCK_ROWS = 64


@dataclass(frozen=True)
class TrunkMerge:
    """How one shared tensor is made from the base and the experts (see the module docstring)."""

    method: str
    base: TensorLocation
    sources: tuple[TensorLocation, ...]
    weights: tuple[float, ...]
    base_weight: float = 1.0
    density: float = 1.0
    scale: float = 1.0
    normalize: bool = True
    seed: int = 0

    @property
    def num_rows(self) -> int:
        """Rows of the tensor seen as a matrix (a 1-D tensor is one row)."""
        return math.prod(self.base.shape[:-1])

    def rows(self, start: int, stop: int, device: torch.device | None = None) -> torch.Tensor:
        """Rows [start, stop) of the merged tensor, float32, shape [stop - start, last dimension].

        >>> merge = TrunkMerge("linear", base, (expert,), (1.0,))   # doctest: +SKIP
        >>> merge.rows(0, 2)                                       # doctest: +SKIP
        """
        device = device or torch.device("cpu")
        base = read_rows(self.base, start, stop).to(device).float()
        deltas = [read_rows(source, start, stop).to(device).float() - base for source in self.sources]
        if self.method == "linear":
            # Written as base + Σ (w_i / S)·d_i: equal to the weighted mean, and exactly the base where every
            # source equals it, with no rounding of b·W_base + Σ w_i W_i and its division.
            weight_sum = self.base_weight + sum(self.weights)
            if not self.normalize:
                return base * weight_sum + sum(
                    weight * delta for weight, delta in zip(self.weights, deltas, strict=True)
                )
            merged = sum((weight / weight_sum) * delta for weight, delta in zip(self.weights, deltas, strict=True))
            return base + merged
        if self.method in DARE_METHODS:
            deltas = [
                delta * self._kept(index, start, stop, delta.shape[-1], device) / self.density
                for index, delta in enumerate(deltas)
            ]
        weighted = [weight * delta for weight, delta in zip(self.weights, deltas, strict=True)]
        merged = torch.stack(weighted).sum(dim=0)
        if self.method == "dare_ties":
            merged = self._sign_consensus(weighted, merged)
        return base + self.scale * merged

    def tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """The whole merged tensor in its own shape (for tensors small enough to hold: one layer's)."""
        return self.rows(0, self.num_rows, device).reshape(self.base.shape)

    def _sign_consensus(self, weighted: list[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
        elected = torch.sign(total)
        agreeing = [(torch.sign(delta) == elected) & (delta != 0) for delta in weighted]
        kept = torch.stack([delta * agree for delta, agree in zip(weighted, agreeing, strict=True)]).sum(dim=0)
        if not self.normalize:
            return kept
        weights = torch.stack(
            [abs(weight) * agree.float() for weight, agree in zip(self.weights, agreeing, strict=True)]
        ).sum(dim=0)
        return torch.where(weights > 0, kept / weights.clamp_min(1e-12), torch.zeros_like(kept))

    def _kept(self, expert: int, start: int, stop: int, columns: int, device: torch.device) -> torch.Tensor:
        """DARE's keep mask for rows [start, stop) of expert `expert`'s delta, as float (1 kept, 0 dropped)."""
        blocks = []
        first_block = start // MASK_BLOCK_ROWS
        for block in range(first_block, (stop - 1) // MASK_BLOCK_ROWS + 1):
            rows = min(MASK_BLOCK_ROWS, self.num_rows - block * MASK_BLOCK_ROWS)
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{expert}:{block}".encode()))
            blocks.append(torch.rand((rows, columns), generator=generator) < self.density)
        mask = torch.cat(blocks)[start - first_block * MASK_BLOCK_ROWS : stop - first_block * MASK_BLOCK_ROWS]
        return mask.to(device=device, dtype=torch.float32)

    def describe(self) -> str:
        """One line for the dry run and the model card."""
        weights = ", ".join(f"{weight:g}" for weight in self.weights)
        if self.method == "linear":
            return f"linear (base weight {self.base_weight:g}, expert weights {weights}, normalize {self.normalize})"
        parts = [f"expert weights {weights}", f"lambda {self.scale:g}"]
        if self.method in DARE_METHODS:
            parts.append(f"density {self.density:g}, seeded drop")
        if self.method == "dare_ties":
            parts.append(f"normalize {self.normalize}")
        return f"{self.method} ({', '.join(parts)})"
