"""GGML block encodings of float rows (f32, f16, bf16, Q8_0 and the legacy quants), as llama.cpp lays them out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ENCODE_VALUES = 1 << 18
"""Values encoded at a time inside a block (1 MiB of float32): each step's temporaries stay in the CPU's cache."""


_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
"""The largest float32 below 0.5: floor(|y| + this), in float32, rounds |y| half away from zero exactly."""


def encode_rows(rows: torch.Tensor, tensor_type: Any) -> torch.Tensor:
    """`rows` (any float dtype) as `tensor_type`'s bytes (a new uint8 tensor): bit for bit what
    `gguf.quants.quantize` makes of their float32 values, which llama.cpp's converter writes.

    F32, F16 and BF16 are torch conversions (round to nearest even, as numpy's and gguf's); Q8_0 is
    `quantize_q8_0`; the legacy quants call the gguf package on the whole block.
    """
    import gguf

    kind = gguf.GGMLQuantizationType
    if tensor_type in (kind.F32, kind.F16):
        target = torch.float32 if tensor_type == kind.F32 else torch.float16
        encoded = torch.empty(rows.shape, dtype=target)
        encoded.copy_(rows)  # a new tensor even when `rows` already has the type: the writer owns it
        return encoded.reshape(-1).view(torch.uint8)
    if tensor_type == kind.Q8_0:
        return quantize_q8_0(rows)
    if tensor_type == kind.BF16 and rows.dtype == torch.bfloat16:
        # gguf rounds float32 to bfloat16 (exact here) and quiets NaNs by setting their mantissa's top bit.
        bits = rows.reshape(-1).view(torch.int16)
        return torch.where(rows.reshape(-1).isnan(), bits | 0x40, bits).view(torch.uint8)
    return torch.from_numpy(gguf.quants.quantize(rows.float().numpy(), tensor_type).reshape(-1))


def quantize_q8_0(rows: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (a float16 scale d = max|x|/127, then round(x/d) as int8, per 32 values) of `rows`,
    bit for bit as `gguf.quants.quantize` (and so ggml's reference quantiser) makes them.

    The steps are gguf's in float32: d = max|x| / 127, inverse = 1/d (0 where d is 0), q = x * inverse
    rounded half away from zero. A block whose scale or inverse is not finite (NaN or Inf values, or
    values so small that 1/d overflows) is left to gguf itself, so even those bytes are the same.
    """
    import gguf

    values = rows.reshape(-1)
    encoded = torch.empty((values.numel() // 32, 34), dtype=torch.uint8)
    for start in range(0, values.numel(), ENCODE_VALUES):
        blocks = values[start : start + ENCODE_VALUES].float().reshape(-1, 32)
        target = encoded[start // 32 : start // 32 + blocks.shape[0]]
        scale = blocks.abs().amax(dim=1, keepdim=True) / 127
        inverse = torch.where(scale == 0, 0.0, 1.0 / scale)
        if not (bool(scale.isfinite().all()) and bool(inverse.isfinite().all())):
            target.copy_(torch.from_numpy(gguf.quants.quantize(blocks.numpy(), gguf.GGMLQuantizationType.Q8_0)))
            continue
        # floor(a + largest float32 below 0.5) is a half-away-from-zero round of a in float32 (unlike
        # a + 0.5, which rounds 0.49999997 up); the sign of x * inverse is x's, as inverse >= 0.
        quantized = blocks.mul(inverse).abs_().add_(_BELOW_HALF).floor_().copysign_(blocks).to(torch.int8)
        target[:, :2] = scale.to(torch.float16).view(torch.uint8)
        target[:, 2:] = quantized.view(torch.uint8)
    return encoded.reshape(-1)
