"""Reading a GGUF output back: its keys and tensor table, and the tensors its config.json implies (verify)."""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures.gguf import GGUF_ARCHITECTURES, llama3_rope_factors, rope_parameters


@dataclass(frozen=True)
class WrittenTensor:
    """One entry of a GGUF file's tensor table."""

    tensor_type: int
    shape: tuple[int, ...]
    """PyTorch order (GGUF stores the dimensions innermost first)."""
    nbytes: int


@dataclass(frozen=True)
class GgufTable:
    """What checking a GGUF file needs from it: its scalar and string keys and its tensor table."""

    fields: dict[str, str | int | float | bool]
    """Every key whose value is not an array."""
    tensors: dict[str, WrittenTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF's fixed-size value types and their struct formats; 8 is a string, 9 an array."""


class _HeaderReader:
    """Reads a GGUF header's values in order from a mapped file, from `position` on."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.position = 0

    def take(self, format: str) -> Any:
        value = struct.unpack_from(format, self.data, self.position)[0]
        self.position += struct.calcsize(format)
        return value

    def text(self) -> str:
        length = self.take("<Q")
        if self.position + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        self.position += length
        return bytes(self.data[self.position - length : self.position]).decode("utf-8", errors="replace")

    def skip_array(self) -> None:
        kind, count = self.take("<I"), self.take("<Q")
        if kind in _SCALARS:
            self.position += count * struct.calcsize(_SCALARS[kind])
        elif kind == 8:
            for _ in range(count):
                length = self.take("<Q")  # before the addition: take moves position itself
                self.position += length
        else:  # arrays of arrays
            for _ in range(count):
                self.skip_array()


TensorEntry = tuple[str, int, tuple[int, ...], int]
"""A tensor table entry as the header gives it: name, GGML type, shape (PyTorch order), offset in the data."""


def read_gguf_table(path: Path) -> GgufTable:
    """The keys and tensor table of the GGUF file at `path`, read straight from its header.

    gguf's GGUFReader builds a numpy view of every key and token (seconds for a 150,000-token
    vocabulary); this walks the header once, skipping arrays, and checks that every tensor's data lies
    within the file. A file that is not a whole GGUF raises ValueError naming what is wrong.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _HeaderReader(data)
        try:
            fields, entries = _read_header(reader)
        except struct.error:
            raise ValueError("its header runs past the end of the file") from None
        alignment = int(fields.get("general.alignment", 32))
        data_start = reader.position + -reader.position % alignment
        tensors = {}
        for name, kind, shape, offset in entries:
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except ValueError:
                raise ValueError(f"tensor {name} has an unknown type {kind}") from None
            nbytes = math.prod(shape) // block * block_bytes
            if data_start + offset + nbytes > len(data):
                raise ValueError(f"tensor {name}'s data runs past the end of the file")
            tensors[name] = WrittenTensor(kind, shape, nbytes)
        return GgufTable(fields, tensors)


def _read_header(reader: _HeaderReader) -> tuple[dict[str, str | int | float | bool], list[TensorEntry]]:
    """The header's non-array keys and its tensor entries; the reader is left at the end of the header."""
    take, text = reader.take, reader.text
    if take("<I") != 0x46554747:  # "GGUF"
        raise ValueError("it does not start with GGUF's magic number")
    version, tensor_count, key_count = take("<I"), take("<Q"), take("<Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not one llama.cpp reads")
    fields: dict[str, str | int | float | bool] = {}
    for _ in range(key_count):
        key, kind = text(), take("<I")
        if kind == 9:
            reader.skip_array()
        elif kind == 8:
            fields[key] = text()
        elif kind in _SCALARS:
            fields[key] = take(_SCALARS[kind])
        else:
            raise ValueError(f"key {key} has an unknown value type {kind}")
    entries: list[TensorEntry] = []
    for _ in range(tensor_count):
        name, dimensions = text(), take("<I")
        if dimensions > 4:
            raise ValueError(f"tensor {name} has {dimensions} dimensions")
        shape = tuple(reversed([take("<Q") for _ in range(dimensions)]))
        entries.append((name, take("<I"), shape, take("<Q")))
    return fields, entries


def gguf_folder_problems(folder: Path) -> tuple[list[str], int] | None:
    """`verify`'s tensor check of a GGUF output: the file's tensors are exactly those its config.json implies
    (names, shapes), for llama.cpp's architecture; None when `folder` holds no GGUF file."""
    from gguf import get_tensor_name_map

    from frankenmoe.architectures.expected import expected_tensors
    from frankenmoe.architectures.tables import OUTPUT_ARCHITECTURES
    from frankenmoe.checkpoint.output_rules import GGUF_FILE_NAME

    files = sorted(
        path
        for path in folder.iterdir()
        if GGUF_FILE_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink()
    )
    if not files:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        output = OUTPUT_ARCHITECTURES[str(config.get("model_type"))]
        architecture = GGUF_ARCHITECTURES[output.model_type]
    except (OSError, ValueError, KeyError) as error:
        return [f"config.json does not describe a frankenmoe GGUF output ({error})"], 0
    layout = output.layouts[output.default_layout]
    expected_hf = expected_tensors(output, layout, config)
    names = get_tensor_name_map(architecture.arch, int(config["num_hidden_layers"]))
    experts = int(config[output.expert_count_key])
    expected: dict[str, tuple[int, ...]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for part, stack in zip(("gate_proj", "up_proj", "down_proj"), architecture.expert_stack, strict=True):
            template = next(tensor.template for tensor in layout.expert_tensors if tensor.parts == (part,))
            member = template.format(layer=layer, expert=0)
            expected[stack.format(layer=layer)] = (experts, *expected_hf[member])
            for expert in range(experts):
                expected_hf.pop(template.format(layer=layer, expert=expert))
    for name, shape in expected_hf.items():
        expected[str(names.get_name(name, try_suffixes=(".weight", ".bias")))] = shape
    rope = rope_parameters(config)
    if architecture.permute_qk and rope.get("rope_type") == "llama3":
        expected["rope_freqs.weight"] = (len(llama3_rope_factors(config, rope)),)
    problems: list[str] = []
    count = 0
    for path in files:
        try:
            table = read_gguf_table(path)
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: cannot be read as GGUF ({error})")
            continue
        found = {name: tensor.shape for name, tensor in table.tensors.items()}
        count += len(found)
        if table.fields.get("general.architecture") != architecture.name:
            problems.append(f"{path.name}: general.architecture is not {architecture.name}")
        for name, shape in expected.items():
            if name not in found:
                problems.append(f"{path.name}: {name} missing (config.json implies it)")
            elif found[name] != shape:
                problems.append(f"{path.name}: {name} has shape {list(found[name])}, config.json implies {list(shape)}")
        problems += [
            f"{path.name}: {name} is a tensor config.json does not imply" for name in found if name not in expected
        ]
    return problems, count
