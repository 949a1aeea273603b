"""The direct GGUF writer's own encoders and header reader give what the gguf package gives.

`encode_rows` (torch F32/F16/BF16 conversions and `quantize_q8_0`) must make the bytes of
`gguf.quants.quantize` on the rows' float32 values, which is what llama.cpp's converter writes; the
edge cases are the ones a vectorised rewrite gets wrong: ties at .5 (gguf rounds them away from zero),
the float32 just below 0.5, all-zero blocks, scales that are float16 subnormals or underflow, values
whose 1/d overflows, and NaN / Inf. `read_gguf_table` must read what GGUFReader reads.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch

from frankenmoe.checkpoint.gguf_file import read_gguf_table
from frankenmoe.errors import OutputError
from frankenmoe.io.gguf_blocks import encode_rows, quantize_q8_0
from frankenmoe.merging import gguf_writer as gguf_output

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _reference(values: torch.Tensor, tensor_type: gguf.GGMLQuantizationType) -> bytes:
    return np.asarray(gguf.quants.quantize(values.float().numpy(), tensor_type)).tobytes()


def _edge_blocks() -> torch.Tensor:
    """Blocks of 32 float32 values, one hard case per block."""
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    blocks = [
        np.zeros(32),
        -np.zeros(32),
        np.r_[127.0, np.arange(31) + 0.5],  # d = 1: every other value is a tie at .5
        np.r_[-127.0, -(np.arange(31) + 0.5)],
        np.r_[127.0, below_half, -below_half, 0.5, -0.5, 1.5, 2.5, -2.5, np.zeros(24)],
        np.r_[254.0, np.arange(31) * 2 + 1],  # d = 2: x/d are ties again
        np.r_[1e-5, np.linspace(-1e-5, 1e-5, 31)],  # d is a float16 subnormal
        np.r_[1e-36, np.linspace(-1e-36, 1e-36, 31)],  # d is a float32 subnormal, float16 zero
        np.r_[3e-39, np.full(31, -1e-39)],  # 1/d overflows to inf: gguf's own result
        np.r_[6e4, np.linspace(-6e4, 6e4, 31)],  # scales near float16's largest
        np.r_[3e38, np.full(31, -1.0)],  # d overflows float16
        np.r_[-3.0, np.full(31, 1.5)],  # a negative maximum
    ]
    return torch.tensor(np.array(blocks), dtype=torch.float32).reshape(-1, 64)


def test_q8_0_equals_gguf_on_random_rows_in_every_source_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 1024, generator=generator) * torch.logspace(-4, 2, 300).reshape(-1, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        typed = rows.to(dtype)
        assert quantize_q8_0(typed).numpy().tobytes() == _reference(typed, Q8_0), dtype


def test_q8_0_equals_gguf_on_ties_tiny_scales_and_zero_blocks() -> None:
    edges = _edge_blocks()
    encoded = quantize_q8_0(edges).numpy().tobytes()
    assert encoded == _reference(edges, Q8_0)
    assert encoded[2:34] == bytes(32)  # an all-zero block: d = 0 and q = 0


def test_q8_0_rounds_every_float32_near_a_tie_as_gguf_does() -> None:
    """x/d = n + 0.5 and its float32 neighbours, for every n a block can hold (d = 1 exactly)."""
    ties = np.arange(127, dtype=np.float32) + np.float32(0.5)
    near = np.concatenate([ties, *(np.nextafter(ties, ties + direction) for direction in (-1, 1))])
    near = np.concatenate([near, np.nextafter(np.float32(0.5), np.float32(0))[None], near[:-1] * -1])
    near = near[: near.size // 31 * 31].reshape(-1, 31)
    blocks = torch.tensor(np.concatenate([np.full((len(near), 1), 127, np.float32), near], axis=1))
    assert quantize_q8_0(blocks).numpy().tobytes() == _reference(blocks, Q8_0)


def test_q8_0_leaves_blocks_with_nan_or_inf_to_gguf() -> None:
    rows = torch.randn(4, 64)
    rows[1, 3], rows[2, 40], rows[3, 0] = float("nan"), float("inf"), -float("inf")
    with mock.patch("gguf.quants.quantize", wraps=gguf.quants.quantize) as quantize:
        encoded = quantize_q8_0(rows)
    assert quantize.call_count == 1
    assert encoded.numpy().tobytes() == _reference(rows, Q8_0)


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q4_0", "Q5_1"])
def test_other_types_equal_gguf_and_never_alias_the_rows(tensor_type: str) -> None:
    kind = gguf.GGMLQuantizationType[tensor_type]
    edges = _edge_blocks()
    special = torch.tensor([[float("nan"), -float("inf"), 7e4, 6.1e-5, 3e-8, -0.0] + [1.0] * 58])
    for dtype in (torch.float32, torch.bfloat16):
        rows = torch.cat([edges, special, torch.randn(8, 64)]).to(dtype)
        encoded = encode_rows(rows, kind)
        assert encoded.dtype == torch.uint8
        assert encoded.numpy().tobytes() == _reference(rows, kind), dtype
        assert encoded.untyped_storage().data_ptr() != rows.untyped_storage().data_ptr()


def test_bf16_rows_keep_their_bits_with_nans_quieted_as_gguf_does() -> None:
    bits = torch.tensor([0x3F80, 0x7F81, -0x007F, 0x7F80, 0x0001], dtype=torch.int16)  # 1, sNaN, -sNaN, inf, tiny
    encoded = encode_rows(bits.view(torch.bfloat16).reshape(1, -1), gguf.GGMLQuantizationType.BF16)
    assert encoded.view(torch.int16).tolist() == [0x3F80, 0x7FC1, -0x003F, 0x7F80, 0x0001]


def _written_gguf(path: Path) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_token_list(["<s>", "a", "héllo"] * 1000)
    writer.add_token_scores([0.5] * 3000)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_tensor("one", np.ones((3, 64), np.float32))
    writer.add_tensor("two", np.zeros((2, 4, 32), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_header_reader_reads_what_ggufreader_reads(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    _written_gguf(path)
    table = read_gguf_table(path)
    reader = gguf.GGUFReader(path)
    assert table.fields["general.architecture"] == "llama" and table.fields["llama.block_count"] == 2
    assert "tokenizer.ggml.tokens" not in table.fields  # arrays are skipped, not read
    assert {name: (t.tensor_type, t.shape, t.nbytes) for name, t in table.tensors.items()} == {
        t.name: (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes)) for t in reader.tensors
    }


def test_the_header_reader_refuses_a_cut_short_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    _written_gguf(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(ValueError, match="tensor two's data runs past the end"):
        read_gguf_table(path)
    path.write_bytes(whole[:5000])
    with pytest.raises(ValueError, match="past the end of the file"):
        read_gguf_table(path)
    path.write_bytes(b"GGML" + whole[4:])
    with pytest.raises(ValueError, match="magic"):
        read_gguf_table(path)


def test_an_encoding_error_stops_the_writer_and_is_raised_here(tmp_path: Path) -> None:
    """The writer's threads hand an error back to the caller instead of hanging or writing on."""
    from frankenmoe.merging.prepare import MergeOptions, prepare_merge
    from tests.test_gguf_output import _toy_sources

    config = _toy_sources(tmp_path)
    prepared = prepare_merge(config, tmp_path / "out", MergeOptions(gguf_type="q8_0"))
    assert prepared.gguf is not None
    failing = mock.patch.object(gguf_output, "encode_rows", side_effect=OutputError("encoding failed"))
    with failing, pytest.raises(OutputError, match="encoding failed"):
        gguf_output.write_gguf(prepared.gguf, lambda: pytest.fail("no routers are needed first"), tmp_path / "x.gguf")
