"""Run a decoder one layer at a time from streamed weights, so no pass holds a whole model.

A layer's attention is computed here from the table's weights, in float32, the way transformers'
decoder layers compute it at inference (RMS norms, q/k norms where a family has them, rotary
embedding as the config resolves it, grouped-query scaled dot-product attention, the sliding window
in the mask); the tests hold it to transformers' own layer for every family. transformers' modeling
modules take about two seconds to import, so no pass imports them: laser's calibration check runs
these same layers with its reduced matrices given as `overrides`. Every matrix (the four attention
projections, the MLP, dense or Mixtral's experts behind the router, and the language-model head)
is applied from the checkpoint file in slices of rows, to every sequence's tokens at once: each
slice is read once per pass however many sequences there are, and a float32 copy of a whole matrix
is never made.

On the CPU the slices of one matrix are spread over `slice_workers()` threads. Each slice is
computed by one thread with one intra-op thread, into that thread's reused buffers, so a result
does not depend on how many workers there are: it is bit for bit the one-worker result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from frankenmoe.architectures.expected import detect_layout
from frankenmoe.architectures.tables import (
    ATTENTION_PROJECTIONS,
    EMBEDDINGS,
    FINAL_NORM,
    LAYER_NORMS,
    LAYER_PREFIX,
    LM_HEAD,
    MLP_PARTS,
    OUTPUT_ARCHITECTURES,
    QK_NORMS,
    SOURCE_FAMILIES,
    OutputArchitecture,
    OutputLayout,
    SourceFamily,
)
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import (
    TensorLocation,
    advise_will_need,
    element_size,
    read_rows,
    read_rows_into,
    read_tensor,
)
from frankenmoe.runtime.compat import rope_frequencies
from frankenmoe.runtime.memory import reuse_large_buffers
from frankenmoe.sources.lora import LoraDelta
from frankenmoe.sources.trunk import TrunkMerge

if TYPE_CHECKING:  # transformers is slow to import: a merge that runs no decoder never imports it
    from transformers import PretrainedConfig

SLICE_BYTES = 4 * 1024 * 1024
"""Float32 bytes of a matrix (attention, MLP or language-model head) converted at a time. On the CPU
each worker thread converts into buffers of its own, reused from slice to slice."""
T = TypeVar("T")


def slice_workers() -> int:
    """How many threads matrix slices are spread over: OMP_NUM_THREADS when it is set (the usual way
    to limit a torch program's threads), else every core this process may run on."""
    try:
        requested = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        requested = 0
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _slice_pool() -> ThreadPoolExecutor:
    """The process's slice workers, started on first use; each runs torch with one intra-op thread."""
    count = slice_workers()
    with _pool_lock:
        pool = _pools.get(count)
        if pool is None:
            pool = ThreadPoolExecutor(count, "frankenmoe-slices", initializer=torch.set_num_threads, initargs=(1,))
            _pools[count] = pool
        return pool


def map_slices(function: Callable[[int], T], starts: Sequence[int], device: torch.device) -> list[T]:
    """`function(start)` for every start, in order: on the slice workers for the CPU, else here.

    Each call runs on one thread with one intra-op thread, so the results are the same for any number
    of workers. A call that reads a slice with `MatrixRows.read(..., reuse=True)` may keep nothing
    that points into the slice after it returns (the buffer is its thread's, reused next time).
    """
    if device.type != "cpu":
        return [function(start) for start in starts]
    return list(_slice_pool().map(function, starts))


class _SliceBuffers(threading.local):
    """One worker thread's buffers for a slice: its bytes as read and as float32, grown when needed."""

    raw: torch.Tensor | None = None
    converted: torch.Tensor | None = None

    def float_rows(self, location: TensorLocation, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of `location` in float32, as a view of this thread's buffer."""
        count = (stop - start) * location.shape[-1]
        if self.converted is None or self.converted.numel() < count:
            self.converted = torch.empty(count, dtype=torch.float32)
        if location.dtype == "F32":
            return read_rows_into(location, start, stop, self.converted)
        nbytes = count * element_size(location.dtype)
        if self.raw is None or self.raw.numel() < nbytes:
            self.raw = torch.empty(nbytes, dtype=torch.uint8)
        rows = read_rows_into(location, start, stop, self.raw)
        return self.converted[: rows.numel()].view(rows.shape).copy_(rows)

    def stored_rows(self, location: TensorLocation, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of `location` in its stored dtype, as a view of this thread's raw buffer."""
        nbytes = (stop - start) * location.shape[-1] * element_size(location.dtype)
        if self.raw is None or self.raw.numel() < nbytes:
            self.raw = torch.empty(nbytes, dtype=torch.uint8)
        return read_rows_into(location, start, stop, self.raw)


_slice_buffers = _SliceBuffers()


@dataclass
class LayerOutputs:
    """What one loaded layer did to one sequence, and the input its router (or MLP) saw."""

    hidden: torch.Tensor
    router_input: torch.Tensor


@dataclass
class LayerPass:
    """Every sequence after one whole layer, with what its router saw."""

    hidden: list[torch.Tensor]
    router_inputs: list[torch.Tensor]
    router_logits: list[torch.Tensor] | None


@dataclass(frozen=True)
class MatrixRows:
    """A block of rows of a checkpoint tensor seen as a matrix: one MLP matrix of one expert.

    With `lora`, the matrix is W + scale * B @ A (a source expert given as model+adapter): each slice
    gets its rows of the delta, so no whole float32 matrix is made here either.
    """

    location: TensorLocation
    first_row: int
    num_rows: int
    lora: LoraDelta | None = None
    merged: TrunkMerge | None = None
    """A merged shared tensor (`shared_weights`): its rows are computed from the base's and experts'."""
    given: torch.Tensor | None = field(default=None, compare=False)
    """The matrix's value given in memory (a laser-reduced matrix, see `StreamedDecoder.forward_layer`'s
    overrides), read instead of the checkpoint's. Not compared: a SliceCache never keeps such a matrix."""

    @classmethod
    def whole(cls, location: TensorLocation, lora: LoraDelta | None = None) -> MatrixRows:
        return cls(location, 0, location.shape[0], lora)

    @classmethod
    def of_tensor(cls, location: TensorLocation, value: torch.Tensor) -> MatrixRows:
        """The matrix at `location` with `value` (same shape) in place of its stored one."""
        return cls(location, 0, location.shape[0], given=value)

    @classmethod
    def of_merge(cls, merged: TrunkMerge) -> MatrixRows:
        return cls(merged.base, 0, merged.num_rows, merged=merged)

    @property
    def slice_starts(self) -> range:
        """First row of each slice that `read` returns, SLICE_BYTES of float32 at most (one row at least)."""
        return range(0, self.num_rows, max(1, SLICE_BYTES // (self.location.shape[-1] * 4)))

    def read(self, start: int, device: torch.device, reuse: bool = False) -> torch.Tensor:
        """The slice of this block that begins at row `start` (one of `slice_starts`), in float32.

        With `reuse` on the CPU, the slice is a view of the calling thread's slice buffer, valid until
        that thread reads its next slice (see `map_slices`); otherwise it is a tensor of its own.
        """
        stop = min(start + self.slice_starts.step, self.num_rows)
        if self.given is not None:
            return self.given[self.first_row + start : self.first_row + stop].to(device=device, dtype=torch.float32)
        if self.merged is not None:
            return self.merged.rows(self.first_row + start, self.first_row + stop, device)
        if reuse and device.type == "cpu":
            rows = _slice_buffers.float_rows(self.location, self.first_row + start, self.first_row + stop)
        else:
            rows = read_rows(self.location, self.first_row + start, self.first_row + stop).to(device).float()
        if self.lora is not None:
            rows += self.lora.rows(self.first_row + start, self.first_row + stop, device)
        return rows


@dataclass(frozen=True)
class MLPWeights:
    """Where a SwiGLU MLP's three matrices are; `down_scale` multiplies down_proj (residual_scale)."""

    gate_proj: MatrixRows
    up_proj: MatrixRows
    down_proj: MatrixRows
    down_scale: float | None = None


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16), with which torch
    multiplies bfloat16 matrices directly, accumulating in float32. Read from Linux's /proc/cpuinfo;
    False where that cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class SliceCache:
    """How a pass gets its matrix slices: kept from pass to pass up to `budget` bytes in all, and with
    `native_bfloat16` multiplied in bfloat16 where the matrix is stored in bfloat16.

    Text generation (router.continuation_tokens) streams the whole model once per token: with a
    budget, the slices read in the first step are kept and the later steps only multiply. A cached
    slice is the very tensor a read would give, so results are the same with or without it; past the
    budget, slices are read as usual. See `weight_cache_bytes` in GateRequest.

    With `native_bfloat16` (text generation on a CPU with bfloat16 matrix units, see
    `cpu_multiplies_bfloat16`), a bfloat16 slice is multiplied as stored, by the tokens rounded to
    bfloat16, with float32 accumulation: no float32 copy of the slice is made, and half the bytes go
    through memory. The products differ from float32 ones by bfloat16 rounding, which can change a
    greedy token where two are nearly tied; they are the same from run to run on one machine (one
    thread per slice), but another CPU's bfloat16 kernels may round differently.
    """

    def __init__(self, budget: int = 0, native_bfloat16: bool = False) -> None:
        self.budget = budget
        self.native_bfloat16 = native_bfloat16
        self.used = 0
        self._slices: dict[object, torch.Tensor] = {}
        self._lock = threading.Lock()

    def multiplies_natively(self, matrix: MatrixRows, device: torch.device) -> bool:
        """Whether `matrix`'s slices are multiplied in their stored bfloat16 (see the class docstring)."""
        return (
            self.native_bfloat16
            and device.type == "cpu"
            and matrix.location.dtype == "BF16"
            and matrix.lora is None
            and matrix.merged is None
            and matrix.given is None
        )

    def slice(self, matrix: MatrixRows, start: int, device: torch.device) -> torch.Tensor:
        """Slice `start` of `matrix` (float32, or bfloat16 where `multiplies_natively`): kept, newly
        kept, or (past the budget) read into the calling thread's reused buffer."""
        native = self.multiplies_natively(matrix, device)
        if matrix.given is not None:  # already in memory, and not told apart from the stored matrix by its key
            return matrix.read(start, device)
        key = (matrix, start)
        try:
            with self._lock:
                cached = self._slices.get(key)
        except TypeError:  # a matrix whose parts cannot be hashed is never kept
            return self._read(matrix, start, device, native, reuse=True)
        if cached is not None:
            return cached
        rows = min(slice_starts(matrix, device, self).step, matrix.num_rows - start)
        nbytes = rows * matrix.location.shape[-1] * (2 if native else 4)
        with self._lock:
            fits = self.used + nbytes <= self.budget
            if fits:
                self.used += nbytes
        if not fits:
            return self._read(matrix, start, device, native, reuse=True)
        value = self._read(matrix, start, device, native, reuse=False)
        with self._lock:
            self._slices[key] = value
        return value

    @staticmethod
    def _read(matrix: MatrixRows, start: int, device: torch.device, native: bool, reuse: bool) -> torch.Tensor:
        if not native:
            return matrix.read(start, device, reuse=reuse)
        step = 2 * matrix.slice_starts.step  # see slice_starts
        first, stop = matrix.first_row + start, matrix.first_row + min(start + step, matrix.num_rows)
        return (
            _slice_buffers.stored_rows(matrix.location, first, stop)
            if reuse
            else read_rows(matrix.location, first, stop)
        )


def slice_starts(matrix: MatrixRows, device: torch.device, cache: SliceCache | None) -> range:
    """The first row of each slice a pass multiplies: `matrix.slice_starts`, or where the slices are
    multiplied as stored bfloat16 (SliceCache), twice as many rows: the same bytes per slice, half the
    reads and hand-offs (about 12% faster at 7B's shape on 2 cores)."""
    if cache is not None and cache.multiplies_natively(matrix, device):
        return range(0, matrix.num_rows, 2 * matrix.slice_starts.step)
    return matrix.slice_starts


def _float_slice(matrix: MatrixRows, start: int, device: torch.device, cache: SliceCache | None) -> torch.Tensor:
    return matrix.read(start, device, reuse=True) if cache is None else cache.slice(matrix, start, device)


def slice_product(
    tokens: torch.Tensor, matrix: MatrixRows, start: int, device: torch.device, cache: SliceCache | None
) -> torch.Tensor:
    """tokens [N, in] @ slice `start` of `matrix`.T, in float32 (see SliceCache for bfloat16 products)."""
    if cache is not None and cache.multiplies_natively(matrix, device):
        return (tokens.to(torch.bfloat16) @ cache.slice(matrix, start, device).T).float()
    return tokens @ _float_slice(matrix, start, device, cache).T


def sliced_linear(
    tokens: torch.Tensor, matrix: MatrixRows, bias: torch.Tensor | None = None, cache: SliceCache | None = None
) -> torch.Tensor:
    """tokens [N, in] @ matrix.T (+ bias): [N, rows], one row slice of the matrix at a time."""
    device = tokens.device

    def rows(start: int) -> torch.Tensor:
        return slice_product(tokens, matrix, start, device, cache)

    output = torch.cat(map_slices(rows, slice_starts(matrix, device, cache), device), dim=-1)
    return output if bias is None else output + bias


def sliced_mlp(
    tokens: torch.Tensor, weights: MLPWeights, activation: nn.Module, cache: SliceCache | None = None
) -> torch.Tensor:
    """down_proj(act(gate_proj x) * up_proj x) for tokens [N, hidden], one row slice at a time."""
    device = tokens.device

    def gated(start: int) -> torch.Tensor:
        gate = activation(slice_product(tokens, weights.gate_proj, start, device, cache))
        # The up slice may be read into the buffer the gate slice was in: the gate product is made by now.
        return gate * slice_product(tokens, weights.up_proj, start, device, cache)

    intermediate = torch.cat(map_slices(gated, slice_starts(weights.gate_proj, device, cache), device), dim=-1)
    output = sliced_linear(intermediate, weights.down_proj, cache=cache)
    return output if weights.down_scale is None else output * weights.down_scale


@dataclass(frozen=True)
class SharedExpert:
    """An MLP every token goes through, its output scaled by sigmoid(tokens · gate) (Qwen2-MoE)."""

    weights: MLPWeights
    gate: torch.Tensor
    """[1, hidden] float32."""


def moe_forward(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    experts: Sequence[MLPWeights],
    top_k: int,
    activation: nn.Module,
    renormalize: bool = True,
    shared: SharedExpert | None = None,
    cache: SliceCache | None = None,
) -> torch.Tensor:
    """A sparse MoE MLP: softmax over all experts in float32, top-k (weights renormalised to 1 when
    `renormalize`), plus the shared expert behind its sigmoid gate when there is one."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    top_weights, top_experts = probabilities.topk(top_k, dim=-1)
    if renormalize:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    output = torch.zeros_like(tokens)
    if shared is not None and shared.weights.down_proj.num_rows and shared.weights.gate_proj.num_rows:
        output += torch.sigmoid(tokens @ shared.gate.T) * sliced_mlp(tokens, shared.weights, activation, cache)
    for index, weights in enumerate(experts):
        chosen = (top_experts == index).any(dim=-1).nonzero().squeeze(-1)
        if len(chosen):
            weight = (top_weights[chosen] * (top_experts[chosen] == index)).sum(dim=-1, keepdim=True)
            output[chosen] += weight * sliced_mlp(tokens[chosen], weights, activation, cache)
    return output


def expert_mlp_weights(
    layout: OutputLayout, tensors: dict[str, TensorLocation], layer: int, expert_count: int
) -> list[MLPWeights]:
    """Where each expert's gate_proj, up_proj and down_proj rows are, in a checkpoint of `layout`."""
    experts: list[dict[str, MatrixRows]] = [{} for _ in range(expert_count)]
    for tensor in layout.expert_tensors:
        for expert in range(expert_count):
            name = tensor.template.format(layer=layer, expert=expert)
            if name not in tensors:
                raise ModelError(f"The checkpoint is missing tensor {name!r} of layer {layer}.")
            location = tensors[name]
            block_rows = location.shape[-2]
            first_row = expert * block_rows if tensor.stacked else 0
            part_rows = block_rows // len(tensor.parts)
            for position, part in enumerate(tensor.parts):
                experts[expert][part] = MatrixRows(location, first_row + position * part_rows, part_rows)
    return [MLPWeights(*(parts[part] for part in MLP_PARTS)) for parts in experts]


@dataclass
class StreamedDecoder:
    """A decoder of any family or output architecture in the tables, its layers loaded one at a time."""

    config: dict[str, Any]
    tensors: Mapping[str, TensorLocation]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    in_memory: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Small tensors (routers, shared-expert gates) given as values, read instead of `tensors`' entry of
    the same name: a merge's routing check uses the computed rows before the writer has written them."""
    merged: Mapping[str, TrunkMerge] = field(default_factory=dict)
    """Shared tensors made from the base and the experts (`shared_weights`), computed where they are read,
    so the hidden-state pass runs on the merged trunk the output will have."""
    read_ahead: bool = False
    """Before each layer, ask the kernel to start reading the next one's tensors (`advise_will_need`), so
    that from a cold page cache the disk reads while this layer computes; each layer is advised once."""
    slice_cache: SliceCache | None = None
    """Where matrix slices converted to float32 are kept between passes (text generation), if anywhere."""

    def __post_init__(self) -> None:
        from transformers import AutoConfig

        model_type = str(self.config.get("model_type"))
        self.family: SourceFamily | None = SOURCE_FAMILIES.get(model_type)
        self.moe: OutputArchitecture | None = OUTPUT_ARCHITECTURES.get(model_type)
        entry = self.family or self.moe
        if entry is None:
            known = sorted({*SOURCE_FAMILIES, *OUTPUT_ARCHITECTURES})
            raise ModelError(f"Cannot run a {model_type!r} model layer by layer; supported: {', '.join(known)}.")
        self.hf_config: PretrainedConfig = AutoConfig.for_model(**self.config)
        self._attention_weights = tuple(weight.name for weight in entry.layer_weights)
        self._activation = activation_function(self.hf_config.hidden_act)
        self._advised: set[int] = set()
        self._heads = int(self.hf_config.num_attention_heads)
        self._kv_heads = int(getattr(self.hf_config, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self._heads)
        self._eps = float(self.hf_config.rms_norm_eps)
        inverse_frequencies, self._rotary_scaling = rotary_frequencies(self.hf_config, self._head_dim)
        self._inverse_frequencies = inverse_frequencies.to(self.device)
        self.layout: OutputLayout | None = None if self.moe is None else detect_layout(self.moe, self.tensors)
        self._expert_count = 0 if self.moe is None else int(self.config.get(self.moe.expert_count_key) or 0)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of one sequence, shape [1, T, hidden], float32."""
        merged = self.merged.get(EMBEDDINGS.name)
        if merged is not None:
            rows = torch.cat([merged.rows(int(token), int(token) + 1) for token in token_ids])
            return rows.unsqueeze(0).to(self.device)
        table = read_tensor(self._tensor(EMBEDDINGS.name))
        return table[token_ids].float().unsqueeze(0).to(self.device)

    def load_attention(self, layer: int, overrides: Mapping[str, torch.Tensor] | None = None) -> LoadedAttention:
        """Layer `layer`'s attention: its norms in float32, and where its projections and their biases are;
        a weight named in `overrides` (by its name in the layer) has the value given there instead."""
        prefix = LAYER_PREFIX.format(layer=layer)
        overrides = overrides or {}
        norms: dict[str, torch.Tensor] = {}
        projections: dict[str, MatrixRows] = {}
        biases: dict[str, torch.Tensor] = {}
        # Only the table's weights: buffers such as rotary_emb.inv_freq are recomputed from the config.
        for name in self._attention_weights:
            if prefix + name not in self.tensors:
                continue
            module_name, _, parameter = name.rpartition(".")
            projection = module_name.removeprefix("self_attn.")
            if projection not in ATTENTION_PROJECTIONS or module_name == projection:
                if name not in (*LAYER_NORMS, *QK_NORMS):
                    raise ModelError(f"Layer weight {prefix + name} has no place in the streamed attention.")
                norms[name] = self._layer_tensor(prefix, name, overrides)
            elif parameter == "weight":
                merged = self.merged.get(prefix + name)
                if name in overrides:
                    projections[projection] = MatrixRows.of_tensor(self.tensors[prefix + name], overrides[name])
                elif merged is not None:
                    projections[projection] = MatrixRows.of_merge(merged)
                else:
                    projections[projection] = MatrixRows.whole(self.tensors[prefix + name])
            else:
                biases[projection] = self._layer_tensor(prefix, name, overrides)
        missing = [f"self_attn.{name}.weight" for name in ATTENTION_PROJECTIONS if name not in projections]
        missing += [name for name in LAYER_NORMS if name not in norms]
        if missing:
            raise ModelError(f"The checkpoint is missing tensor {prefix}{missing[0]}.")
        return LoadedAttention(norms, projections, biases, self.slice_cache)

    def _layer_tensor(self, prefix: str, name: str, overrides: Mapping[str, torch.Tensor]) -> torch.Tensor:
        given = overrides.get(name)
        value = self._float_tensor(prefix + name) if given is None else given.float()
        return value.to(self.device)

    def forward_layer(
        self,
        layer: int,
        hidden: list[torch.Tensor],
        caches: Sequence[KeyValueCache] | None = None,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> LayerPass:
        """Run every sequence ([1, T, hidden] each) through layer `layer` (behind its cache, see `attend`).

        `overrides` replace weights of this layer for this call, by their name in the layer
        (`mlp.gate_proj.weight`, `self_attn.q_proj.weight`...): laser's calibration check runs the layer
        with a reduced matrix this way, without writing it anywhere.
        """
        self._check_overrides(layer, overrides or {})
        outputs = self.attend(layer, hidden, caches, overrides)
        router_inputs = [output.router_input for output in outputs]
        with torch.no_grad():
            mlp_outputs, logits = self.mlp(layer, torch.cat(router_inputs), overrides)
        lengths = [len(inputs) for inputs in router_inputs]
        return LayerPass(
            hidden=add_mlp_outputs(outputs, mlp_outputs),
            router_inputs=router_inputs,
            router_logits=None if logits is None else list(logits.split(lengths)),
        )

    def _check_overrides(self, layer: int, overrides: Mapping[str, torch.Tensor]) -> None:
        """Refuse an override this decoder would not use (a misspelt name would otherwise change nothing)."""
        prefix = LAYER_PREFIX.format(layer=layer)
        mlp_names = () if self.family is None else tuple(weight.name for weight in self.family.mlp.values())
        replaceable = {*self._attention_weights, *mlp_names}
        for name, value in overrides.items():
            location = self.tensors.get(prefix + name)
            if name not in replaceable or location is None:
                raise ModelError(
                    f"Cannot override {prefix + name}: it is not a weight of this checkpoint's layer {layer} that "
                    f"the streamed decoder runs ({', '.join(sorted(replaceable))})."
                )
            if tuple(value.shape) != tuple(location.shape):
                raise ModelError(
                    f"The override of {prefix + name} has shape {tuple(value.shape)}, but the weight it replaces "
                    f"has shape {tuple(location.shape)}."
                )

    def attend(
        self,
        layer: int,
        hidden: list[torch.Tensor],
        caches: Sequence[KeyValueCache] | None = None,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> list[LayerOutputs]:
        """Every sequence through layer `layer`'s attention: the residual stream after it, and the MLP's input.

        With `caches` (one per sequence), `hidden` holds only each sequence's new tokens; they attend to
        the keys and values their cache holds, which then gains theirs.
        """
        if self.read_ahead:
            self._advise(layer)
            self._advise(layer + 1)
        attention = self.load_attention(layer, overrides)
        per_sequence = caches if caches is not None else [None] * len(hidden)
        lengths = [state.shape[1] for state in hidden]
        with torch.no_grad():
            residual = torch.cat([state[0] for state in hidden])
            normed = self._rms_norm(residual, attention.norms[LAYER_NORMS[0]])
            q, k, v = (attention.project(name, normed) for name in ("q_proj", "k_proj", "v_proj"))
            groups = self._heads // self._kv_heads
            attended = []
            offset = 0
            for cache, length in zip(per_sequence, lengths, strict=True):
                rows = slice(offset, offset + length)
                offset += length
                past = 0 if cache is None else cache.length(layer)
                query = self._heads_of(q[rows], self._heads, attention.norms.get(QK_NORMS[0]))
                key = self._heads_of(k[rows], self._kv_heads, attention.norms.get(QK_NORMS[1]))
                value = self._heads_of(v[rows], self._kv_heads)
                query, key = self._rotate(query, key, torch.arange(past, past + length, device=self.device))
                if cache is not None:
                    key, value = cache.extend(layer, key, value)
                output = nn.functional.scaled_dot_product_attention(
                    query,
                    key.repeat_interleave(groups, dim=1),
                    value.repeat_interleave(groups, dim=1),
                    attn_mask=self._causal_mask(layer, length, past),
                    scale=self._head_dim**-0.5,
                )
                attended.append(output[0].transpose(0, 1).reshape(length, self._heads * self._head_dim))
            after = residual + attention.project("o_proj", torch.cat(attended))
            router_inputs = self._rms_norm(after, attention.norms[LAYER_NORMS[1]])
        return [
            LayerOutputs(state.unsqueeze(0), router_input)
            for state, router_input in zip(after.split(lengths), router_inputs.split(lengths), strict=True)
        ]

    def _rms_norm(self, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = tokens.pow(2).mean(-1, keepdim=True)
        return weight * (tokens * torch.rsqrt(variance + self._eps))

    def _heads_of(self, projected: torch.Tensor, heads: int, norm: torch.Tensor | None = None) -> torch.Tensor:
        """[T, heads * head_dim] -> [1, heads, T, head_dim], each head RMS-normed first where the family does."""
        split = projected.view(len(projected), heads, self._head_dim)
        if norm is not None:
            split = self._rms_norm(split, norm)
        return split.transpose(0, 1).unsqueeze(0)

    def _rotate(
        self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position embedding of queries and keys [1, heads, T, head_dim] at `positions`."""
        angles = positions[:, None].float() * self._inverse_frequencies[None, :]
        both = torch.cat((angles, angles), dim=-1)
        cos, sin = both.cos() * self._rotary_scaling, both.sin() * self._rotary_scaling

        def rotated(states: torch.Tensor) -> torch.Tensor:
            first, second = states.chunk(2, dim=-1)
            return states * cos + torch.cat((-second, first), dim=-1) * sin

        return rotated(query), rotated(key)

    def mlp(
        self, layer: int, tokens: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's MLP on `tokens` [N, hidden], and for a MoE layer its router logits [N, experts]
        (`overrides` as in `forward_layer`: a MoE layer's experts are never overridden)."""
        logits = self.router_logits(layer, tokens)
        if logits is None or self.moe is None or self.layout is None:
            return self.dense_mlp(layer, tokens, overrides), None
        experts = expert_mlp_weights(self.layout, self.tensors, layer, self._expert_count)
        top_k = int(self.config.get("num_experts_per_tok", 2))
        renormalize = self.moe.routing.renormalizes(self.config)
        shared = self._shared_expert(layer)
        output = moe_forward(tokens, logits, experts, top_k, self._activation, renormalize, shared, self.slice_cache)
        return output, logits

    def router_logits(self, layer: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """A MoE layer's router logits [N, experts] for `tokens` [N, hidden] (None for a dense layer)."""
        if self.moe is None or self.layout is None:
            return None
        gate = self._small_tensor(self.layout.router_name(layer)).float().to(self.device)
        return tokens @ gate.T

    def _shared_expert(self, layer: int) -> SharedExpert | None:
        slots = None if self.moe is None else self.moe.shared_expert
        if slots is None:
            return None
        weights = MLPWeights(
            *(MatrixRows.whole(self._tensor(slots.mlp[part].format(layer=layer))) for part in MLP_PARTS)
        )
        gate = self._small_tensor(slots.gate.format(layer=layer)).float().to(self.device)
        return SharedExpert(weights, gate)

    def dense_mlp(
        self, layer: int, tokens: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A dense layer's MLP applied to `tokens` [N, hidden], reading its weights in row slices (a matrix
        named in `overrides` by its name in the layer, e.g. `mlp.up_proj.weight`, from the value given there)."""
        if self.family is None:
            raise ModelError("A MoE checkpoint has no dense MLP; use mlp, which routes to its experts.")
        family = self.family
        overrides = overrides or {}

        def matrix(part: str) -> MatrixRows:
            location = self._tensor(family.mlp_name(layer, part))
            given = overrides.get(family.mlp[part].name)
            return MatrixRows.whole(location) if given is None else MatrixRows.of_tensor(location, given)

        weights = MLPWeights(*(matrix(part) for part in MLP_PARTS))
        return sliced_mlp(tokens, weights, self._activation, self.slice_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and language-model head: [1, T, hidden] -> [T, vocab]."""
        head = self._float_tensor(self._head().name).to(self.device)
        return (self._final_norm(hidden[0]) @ head.T).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most likely next token after each of `hidden` [N, hidden], the head read in row slices."""
        normed = self._final_norm(hidden)
        head = self._head_rows()
        best_logits = torch.full((len(hidden),), float("-inf"), device=self.device)
        best_tokens = torch.zeros(len(hidden), dtype=torch.long, device=self.device)

        def slice_best(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            return slice_product(normed, head, start, self.device, self.slice_cache).max(dim=-1)

        starts = slice_starts(head, self.device, self.slice_cache)
        for start, (slice_logits, slice_tokens) in zip(
            starts, map_slices(slice_best, starts, self.device), strict=True
        ):
            better = slice_logits > best_logits  # strict: a tie keeps the lower token id, as argmax does
            best_logits = torch.where(better, slice_logits, best_logits)
            best_tokens = torch.where(better, slice_tokens + start, best_tokens)
        return best_tokens

    def target_log_probabilities(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[i] | hidden[i]) for `hidden` [N, hidden], float32 [N]: the head is read in row
        slices and each slice's log-sum-exp is combined in slice order, so no [N, vocab] logits are held
        and the result is the same for any number of slice workers."""
        normed = self._final_norm(hidden)
        head = self._head_rows()

        def slice_scores(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            logits = slice_product(normed, head, start, self.device, self.slice_cache)
            inside = (targets >= start) & (targets < start + logits.shape[-1])
            picked = logits.gather(1, (targets - start).clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
            return torch.logsumexp(logits, dim=-1), torch.where(inside, picked, torch.zeros_like(picked))

        parts = map_slices(slice_scores, slice_starts(head, self.device, self.slice_cache), self.device)
        normaliser = torch.logsumexp(torch.stack([normalisers for normalisers, _ in parts]), dim=0)
        # Exactly one slice holds each target; the others add exact zeros.
        return torch.stack([picked for _, picked in parts]).sum(dim=0) - normaliser

    def _head_rows(self) -> MatrixRows:
        merged_head = self.merged.get(self._head().name)
        return MatrixRows.whole(self._head()) if merged_head is None else MatrixRows.of_merge(merged_head)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._rms_norm(hidden, self._float_tensor(FINAL_NORM.name).to(self.device))

    def _head(self) -> TensorLocation:
        return self._tensor(EMBEDDINGS.name if self.config.get("tie_word_embeddings") else LM_HEAD.name)

    def _causal_mask(self, layer: int, length: int, past: int = 0) -> torch.Tensor:
        """Additive mask of `length` new tokens over themselves and the `past` tokens before them.

        The sliding window is the one transformers' config resolves for this layer (Qwen configs carry
        a window that applies only with use_sliding_window, and only to some layers).
        """
        queries = torch.arange(past, past + length, device=self.device)
        keys = torch.arange(past + length, device=self.device)
        allowed = keys[None, :] <= queries[:, None]
        window = getattr(self.hf_config, "sliding_window", None)
        layer_types = getattr(self.hf_config, "layer_types", None)
        if layer_types and layer_types[layer] != "sliding_attention":
            window = None
        if window:
            allowed &= keys[None, :] > queries[:, None] - int(window)
        mask = torch.zeros(length, past + length, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return mask[None, None]

    def _float_tensor(self, name: str) -> torch.Tensor:
        """A whole tensor in float32: merged from the base and the experts when it is, else read."""
        merged = self.merged.get(name)
        return read_tensor(self._tensor(name)).float() if merged is None else merged.tensor()

    def _tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"The checkpoint has no tensor {name!r}.") from None

    def _advise(self, layer: int) -> None:
        """Read-ahead hints for layer `layer`'s tensors (past the last layer: the final norm and the head)."""
        if layer in self._advised or layer > self.num_layers:
            return
        self._advised.add(layer)
        if layer == self.num_layers:
            names = [FINAL_NORM.name, self._head().name]
        else:
            prefix = LAYER_PREFIX.format(layer=layer)
            names = [name for name in self.tensors if name.startswith(prefix)]
        advise_will_need(self.tensors[name] for name in names if name in self.tensors)

    def _small_tensor(self, name: str) -> torch.Tensor:
        """A router or gate: the value given in `in_memory`, else the tensor read from the checkpoint."""
        given = self.in_memory.get(name)
        return read_tensor(self._tensor(name)) if given is None else given


def add_mlp_outputs(outputs: list[LayerOutputs], mlp_outputs: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's residual stream after the whole layer, from the MLP's output over all their tokens."""
    lengths = [len(output.router_input) for output in outputs]
    return [
        output.hidden + mlp_output.unsqueeze(0)
        for output, mlp_output in zip(outputs, mlp_outputs.split(lengths), strict=True)
    ]


@dataclass
class LoadedAttention:
    """One layer's attention: its norms (the layer's two, and q/k norms where the family has them) in
    float32, and where its projection matrices and their biases are."""

    norms: dict[str, torch.Tensor]
    projections: dict[str, MatrixRows]
    biases: dict[str, torch.Tensor]
    cache: SliceCache | None = None

    def project(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """Projection `name` (q_proj, k_proj, v_proj, o_proj) of tokens [N, in], as nn.Linear computes it."""
        return sliced_linear(tokens, self.projections[name], self.biases.get(name), self.cache)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}
"""config `hidden_act` values and the functions transformers gives them (every family here uses silu)."""


def activation_function(name: str) -> nn.Module:
    """The MLP activation a config's `hidden_act` names."""
    if name not in ACTIVATIONS:
        raise ModelError(
            f"The config's hidden_act {name!r} is not one frankenmoe's layer-by-layer passes know "
            f"({', '.join(ACTIVATIONS)}), so they cannot run this model. Merge with gate_mode: random and "
            "--no-check, which run no forward pass."
        )
    return ACTIVATIONS[name]()


def rotary_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] and the scale of its cos and sin, from the config as
    transformers resolves it (rope scaling of every kind included)."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = float(parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    inverse_frequencies, scaling = rope_frequencies(config, rope_type)
    return inverse_frequencies.float(), scaling


class KeyValueCache:
    """One sequence's keys (rotary embedding applied) and values in every layer, for the tokens seen so far."""

    def __init__(self) -> None:
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer: int) -> int:
        held = self._layers.get(layer)
        return 0 if held is None else held[0].shape[-2]

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new tokens' keys and values ([1, kv_heads, T, head_dim]); the layer's keys and values so far."""
        held = self._layers.get(layer)
        if held is not None:
            keys, values = torch.cat((held[0], keys), dim=-2), torch.cat((held[1], values), dim=-2)
        self._layers[layer] = (keys, values)
        return keys, values


def router_inputs_by_layer(
    decoder: StreamedDecoder, sequences: Sequence[torch.Tensor], layers: Iterable[int] | None = None
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """For each layer in order, every sequence's router input ([T, hidden], float32).

    Only one layer's attention weights and one slice of an MLP matrix are in memory at a time; the
    residual stream of every sequence is carried from layer to layer.
    """
    hidden = [decoder.embed(tokens) for tokens in sequences]
    for layer in layers if layers is not None else range(decoder.num_layers):
        layer_pass = decoder.forward_layer(layer, hidden)
        hidden = layer_pass.hidden
        yield layer, layer_pass.router_inputs


def greedy_continuations(
    decoder: StreamedDecoder,
    sequences: Sequence[torch.Tensor],
    max_new_tokens: int,
    stop_tokens: Collection[int],
    on_step: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    """What the model writes after each sequence, greedily: up to `max_new_tokens` token ids each.

    A continuation ends before its first stop token, and where the model's context would overflow.
    Every step streams the whole decoder once for all unfinished sequences together; each sequence's
    keys and values are cached, so a step costs one token per sequence.
    """
    limit = int(decoder.config.get("max_position_embeddings") or 0)
    budgets = [max(0, min(max_new_tokens, limit - len(tokens))) if limit else max_new_tokens for tokens in sequences]
    written: list[list[int]] = [[] for _ in sequences]
    caches = [KeyValueCache() for _ in sequences]
    feeding = {index: tokens for index, tokens in enumerate(sequences) if budgets[index] > 0}
    with reuse_large_buffers():
        for _ in range(max(budgets, default=0)):
            if not feeding:
                break
            active = list(feeding)
            next_tokens = _greedy_step(
                decoder, [feeding[index] for index in active], [caches[index] for index in active]
            )
            feeding = {}
            for index, token in zip(active, next_tokens, strict=True):
                if token in stop_tokens:
                    continue
                written[index].append(token)
                if len(written[index]) < budgets[index]:
                    feeding[index] = torch.tensor([token], dtype=torch.long)
            if on_step is not None:
                on_step()
    return [torch.tensor(tokens, dtype=torch.long) for tokens in written]


def _greedy_step(decoder: StreamedDecoder, new_tokens: list[torch.Tensor], caches: list[KeyValueCache]) -> list[int]:
    """Run each sequence's new tokens through every layer behind its cache; the next token of each."""
    hidden = [decoder.embed(tokens) for tokens in new_tokens]
    for layer in range(decoder.num_layers):
        hidden = decoder.forward_layer(layer, hidden, caches).hidden
    with torch.no_grad():
        return decoder.greedy_tokens(torch.cat([state[0, -1:] for state in hidden])).tolist()
