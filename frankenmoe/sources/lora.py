"""LoRA adapters as experts: `source_model: model_ref+adapter_ref` (mergekit's syntax).

The adapter is a PEFT folder (adapter_config.json plus adapter_model.safetensors, or adapter_model.bin
read by the pickle loader), local or in the Hugging Face cache. Only its config and its files' headers
are read here; for every MLP matrix W [out, in] it adapts, the expert's matrix is

    W' = W + scale * (B @ A),   A = lora_A [r, in],  B = lora_B [out, r],
    scale = lora_alpha / r  (or lora_alpha / sqrt(r) with use_rslora),

with r and lora_alpha per module from rank_pattern / alpha_pattern. The writer computes W' in float32
(the product, then the scale, then the sum, as peft merges a float32 model) and casts it once; the
streamed forward passes add the same delta to each row slice they read. Which modules are adapted
follows peft's rules for target_modules, exclude_modules and layers_to_transform. The adapter's parts
outside the MLP (attention, embeddings, head) cannot enter an expert: they are left out, with a warning
per kind, and the model card records them. Variants that change the formula are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from frankenmoe.io.safetensors import TensorLocation, read_rows, read_tensor


@dataclass(frozen=True)
class LoraDelta:
    """scale * (B @ A) for one weight matrix [out, in]: A is lora_A [rank, in], B is lora_B [out, rank]."""

    lora_a: TensorLocation
    lora_b: TensorLocation
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (float32, the whole matrix, changed in place) plus the delta.

        The order is peft's for a float32 model, (B @ A) * scale and then the sum, so the result is the
        bits merge_and_unload gives; the product is made whole because a row slice of a matrix product
        need not round like the same rows of the whole product.
        """
        delta = read_tensor(self.lora_b).float() @ read_tensor(self.lora_a).float()
        delta *= self.scale
        return weight.add_(delta)

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows start:stop of the delta in float32 on `device`, for passes that read a matrix in row slices."""
        lora_b = read_rows(self.lora_b, start, stop).to(device).float()
        return (lora_b @ read_tensor(self.lora_a).to(device).float()) * self.scale


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter applied to one model: the delta of every MLP matrix it adapts."""

    reference: str
    path: Path
    weight_file: Path
    use_rslora: bool
    trained_on: str | None
    """adapter_config.json's base_model_name_or_path, as the adapter's author recorded it."""
    deltas: dict[str, LoraDelta]
    """Model tensor name (model.layers.0.mlp.gate_proj.weight) -> its delta."""
    left_out: dict[str, tuple[str, ...]]
    """Module kind (attention, embeddings, lm_head) -> the adapted modules of that kind the merge cannot carry."""

    def delta(self, tensor_name: str) -> LoraDelta | None:
        return self.deltas.get(tensor_name)

    @property
    def ranks(self) -> str:
        """'16', or '8-16' when rank_pattern varies it ('-' when no MLP matrix is adapted)."""
        return _span(sorted({delta.rank for delta in self.deltas.values()}))

    @property
    def scales(self) -> str:
        return _span(sorted({delta.scale for delta in self.deltas.values()}))

    def left_out_summary(self) -> str:
        """The adapted modules outside the MLP, per kind, in one phrase ('' when there are none)."""
        return "; ".join(f"{kind} ({modules_phrase(modules)})" for kind, modules in self.left_out.items())

    def summary(self) -> str:
        """One line for the dry run: the adapter, its rank and scale, what it adapts and what is left out."""
        rslora = ", rslora" if self.use_rslora else ""
        line = f"LoRA {self.reference}: rank {self.ranks}, scale {self.scales}{rslora}; {len(self.deltas)} MLP matrices"
        left_out = self.left_out_summary()
        return f"{line}; not carried: {left_out}" if left_out else line


def modules_phrase(modules: tuple[str, ...]) -> str:
    """'q_proj, v_proj: 4 matrices': the distinct last components of module names, and how many modules."""
    names = dict.fromkeys(module.rsplit(".", 1)[-1] for module in modules)
    return f"{', '.join(names)}: {len(modules)} {'matrix' if len(modules) == 1 else 'matrices'}"


def _span(values: list[float] | list[int]) -> str:
    """The smallest and largest of sorted `values` ('4', '2-4'); '-' for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:g}"
    return f"{values[0]:g}-{values[-1]:g}"
