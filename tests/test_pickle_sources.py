"""Pickle-format sources: torch.save files read as byte ranges through torch's weights-only unpickler.

The models are tiny Llamas with safetensors weights and their "pickle twins": the same tensors saved
with torch.save as pytorch_model.bin, or as two shards with pytorch_model.bin.index.json, next to the
same config.json (transformers 5 no longer writes pickles, so torch.save stands in for it).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from frankenmoe.errors import ModelError
from frankenmoe.io.pickles import read_pickle_index
from frankenmoe.io.safetensors import read_rows, read_tensor
from frankenmoe.io.shards import ShardEntry, ShardWriter
from frankenmoe.sources.model import load_source
from frankenmoe.testing.toymodels import write_toy_model
from tests.support import run_cli, write_config
from tests.test_memory_bound import LARGER_LAYERS, SMALLER_LAYERS, merge_peak_rss, model_set, output_bytes

MODEL_ERROR = 3


@dataclass(frozen=True)
class Llamas:
    """A base and two MLP fine-tunes, each in three forms: safetensors, one .bin file, two .bin shards."""

    safetensors: tuple[Path, ...]
    single: tuple[Path, ...]
    sharded: tuple[Path, ...]


def pickle_twin(source: Path, target: Path, *, shards: int = 1) -> Path:
    """`source` with its weights saved by torch.save: pytorch_model.bin, or `shards` files and an index."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(source / "model.safetensors")
    if shards == 1:
        # A state dict as nn.Module.state_dict() gives it: an OrderedDict carrying `_metadata`.
        state: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
        state._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
        torch.save(state, target / "pytorch_model.bin")
        return target
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = names[shard * per_shard : (shard + 1) * per_shard]
        torch.save({name: tensors[name] for name in part}, target / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (target / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return target


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> Llamas:
    root = tmp_path_factory.mktemp("llamas")
    originals = (
        write_toy_model(root / "base", model_type="llama", base_seed=11),
        *(write_toy_model(root / f"expert{seed}", model_type="llama", base_seed=11, mlp_seed=seed) for seed in (1, 2)),
    )
    return Llamas(
        originals,
        tuple(pickle_twin(model, root / "single" / model.name) for model in originals),
        tuple(pickle_twin(model, root / "sharded" / model.name, shards=2) for model in originals),
    )


def merge(models: tuple[Path, ...], folder: Path, *options: str) -> Path:
    folder.mkdir()
    config = write_config(folder / "moe.yaml", models[0], models[1:], gate_mode="hidden")
    result = run_cli("merge", config, folder / "out", *options)
    assert result.exit_code == 0, result.output
    return folder / "out"


def weight_files(checkpoint: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(checkpoint.iterdir())
        if path.suffix == ".safetensors" or path.name in ("model.safetensors.index.json", "config.json")
    }


@pytest.mark.parametrize("form", ["single", "sharded"])
def test_pickle_twin_is_indexed_like_its_safetensors_original(llamas: Llamas, form: str) -> None:
    original = load_source(str(llamas.safetensors[1]))
    twin = load_source(str(getattr(llamas, form)[1]))

    assert (original.weight_format, twin.weight_format) == ("safetensors", "pickle")
    assert twin.tensors.keys() == original.tensors.keys()
    assert len({location.file for location in twin.tensors.values()}) == (1 if form == "single" else 2)
    for name, location in twin.tensors.items():
        assert (location.dtype, location.shape) == (original.tensors[name].dtype, original.tensors[name].shape)
        assert torch.equal(read_tensor(location), read_tensor(original.tensors[name])), name
    mlp = twin.family.mlp_name(1, "up_proj")
    assert torch.equal(read_rows(twin.tensors[mlp], 3, 9), read_rows(original.tensors[mlp], 3, 9))


@pytest.mark.parametrize("form", ["single", "sharded"])
def test_merge_of_pickle_sources_is_byte_identical_to_the_safetensors_merge(
    llamas: Llamas, tmp_path: Path, form: str
) -> None:
    from_safetensors = merge(llamas.safetensors, tmp_path / "safetensors")
    from_pickles = merge(getattr(llamas, form), tmp_path / form)

    expected = weight_files(from_safetensors)
    assert any(name.endswith(".safetensors") for name in expected)
    assert weight_files(from_pickles) == expected
    card = (from_pickles / "README.md").read_text()
    assert "| source weights | pickle-format (read with torch's weights-only unpickler): " in card
    assert all(str(model) in card for model in getattr(llamas, form))
    assert "| source weights | safetensors |" in (from_safetensors / "README.md").read_text()


def test_dry_run_says_which_sources_are_pickle_format(llamas: Llamas, tmp_path: Path) -> None:
    mixed = (llamas.safetensors[0], llamas.single[1], llamas.safetensors[2])
    config = write_config(tmp_path / "moe.yaml", mixed[0], mixed[1:], gate_mode="hidden")

    result = run_cli("merge", config, tmp_path / "out", "--dry-run")

    assert result.exit_code == 0, result.output
    assert (
        f"source weights: pickle-format (read with torch's weights-only unpickler): {llamas.single[1]}; "
        "the others safetensors\n" in result.output
    )


# --- what is read, and what is never opened ------------------------------------------------------------------------


class _CreatesFolderWhenUnpickled:
    """Unpickling this runs os.mkdir: the marker folder proves whether a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def test_safetensors_win_over_pickle_weights_beside_them(llamas: Llamas, tmp_path: Path) -> None:
    folder = shutil.copytree(llamas.safetensors[1], tmp_path / "both")
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _CreatesFolderWhenUnpickled(marker)}, folder / "pytorch_model.bin")

    model = load_source(str(folder))

    assert model.weight_format == "safetensors"
    assert {location.file.name for location in model.tensors.values()} == {"model.safetensors"}
    assert not marker.exists()


def test_training_state_pickles_beside_the_weights_are_never_opened(llamas: Llamas, tmp_path: Path) -> None:
    folder = shutil.copytree(llamas.single[1], tmp_path / "trainer-output")
    marker = tmp_path / "unpickled"
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth"):
        (folder / name).write_bytes(pickle.dumps(_CreatesFolderWhenUnpickled(marker)))

    model = load_source(str(folder))

    assert {location.file.name for location in model.tensors.values()} == {"pytorch_model.bin"}
    assert not marker.exists()


def _zip_payload(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": _CreatesFolderWhenUnpickled(marker)}, path)


def _bare_pickle_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_CreatesFolderWhenUnpickled(marker)))


def _legacy_format_payload(path: Path, marker: Path) -> None:
    torch.save(
        {"w": torch.ones(2), "x": _CreatesFolderWhenUnpickled(marker)}, path, _use_new_zipfile_serialization=False
    )


@pytest.mark.parametrize(
    ("write_payload", "reason"),
    [
        (_zip_payload, f"asks its unpickler for {os.mkdir.__module__}.mkdir, which is not a tensor"),
        (_bare_pickle_payload, "is not in torch's zip format"),
        (_legacy_format_payload, "wrote before torch 1.6"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_malicious_pytorch_model_bin_is_refused_and_never_runs(
    llamas: Llamas, tmp_path: Path, write_payload: Callable[[Path, Path], None], reason: str
) -> None:
    folder = shutil.copytree(llamas.single[1], tmp_path / "expert")
    marker = tmp_path / "unpickled"
    write_payload(folder / "pytorch_model.bin", marker)
    config = write_config(tmp_path / "moe.yaml", llamas.single[0], [llamas.single[2], folder], gate_mode="hidden")

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == MODEL_ERROR, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"model error: {folder / 'pytorch_model.bin'} ")
    assert reason in message
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_torch_older_than_2_6_is_refused_before_anything_is_unpickled(
    llamas: Llamas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")

    with pytest.raises(ModelError) as caught:
        load_source(str(llamas.single[0]))

    assert "needs torch 2.6 or later, but torch 2.5.1+cpu is installed" in caught.value.message
    assert "CVE-2025-32434" in caught.value.message


# --- state dicts that are not byte ranges of plain tensors ---------------------------------------------------------


def test_views_of_one_storage_become_ranges_inside_it(tmp_path: Path) -> None:
    fused = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    path = tmp_path / "views.bin"
    torch.save({"fused": fused, "lower": fused[2:5], "row": fused[5], "tied": fused}, path)

    locations = read_pickle_index(path)

    assert locations["lower"].start == locations["fused"].start + 2 * 4 * 4
    assert locations["row"].end == locations["fused"].end
    assert (locations["tied"].start, locations["tied"].end) == (locations["fused"].start, locations["fused"].end)
    assert torch.equal(read_tensor(locations["lower"]), fused[2:5])
    assert torch.equal(read_tensor(locations["row"]), fused[5])


def test_copy_bytes_copies_a_pickled_tensor_unchanged(tmp_path: Path) -> None:
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    torch.save({"w": weight}, tmp_path / "source.bin")
    location = read_pickle_index(tmp_path / "source.bin")["w"]
    target = tmp_path / "copy.safetensors"

    writer = ShardWriter(target, [ShardEntry("w", location.dtype, location.shape)], {})
    writer.begin("w")
    writer.copy_bytes(location)
    writer.close()

    assert torch.equal(load_file(target)["w"], weight)


def _rewrite_archive(path: Path, change: Callable[[zipfile.ZipInfo, bytes], tuple[bytes, int]]) -> None:
    """Rewrite every member of a torch zip file through `change(info, data) -> (data, compress_type)`."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            new_data, compression = change(info, data)
            archive.writestr(info.filename, new_data, compress_type=compression)


def _compressed_storage(path: Path) -> None:
    torch.save({"w": torch.zeros(64)}, path)
    _rewrite_archive(path, lambda info, data: (data, zipfile.ZIP_DEFLATED if "/data/" in info.filename else 0))


def _big_endian(path: Path) -> None:
    torch.save({"w": torch.zeros(4)}, path)
    _rewrite_archive(path, lambda info, data: (b"big" if info.filename.endswith("/byteorder") else data, 0))


def _truncated(path: Path) -> None:
    torch.save({"w": torch.zeros(1024)}, path)
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (lambda path: torch.save({"w": torch.ones(3, 4).t()}, path), "tensor 'w' is stored as a strided view"),
        (lambda path: torch.save({"state_dict": {"w": torch.ones(2)}}, path), "its entry 'state_dict' is a dict"),
        (lambda path: torch.save({"w": torch.ones(2), "step": 3}, path), "its entry 'step' is a int, not a tensor"),
        (lambda path: torch.save([torch.ones(2)], path), "it holds a list"),
        (
            lambda path: torch.save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, path),
            "holds tensors of dtype float8_e4m3fn, which frankenmoe does not support",
        ),
        (
            lambda path: torch.save({"w": torch.zeros(2, dtype=torch.complex64)}, path),
            "Tensor 'w' in {path} has dtype complex64, which frankenmoe does not support",
        ),
        (_compressed_storage, "stores storage '0' compressed"),
        (_big_endian, "stores its tensors big-endian"),
        (_truncated, "is not a valid torch weights file: its zip structure is damaged"),
    ],
    ids=[
        "transposed",
        "nested",
        "not-a-tensor",
        "list",
        "fp8",
        "complex",
        "compressed",
        "big-endian",
        "truncated",
    ],
)
def test_pickles_that_are_not_plain_contiguous_tensors_are_refused_with_the_reason(
    tmp_path: Path, write: Callable[[Path], None], fragment: str
) -> None:
    path = tmp_path / "pytorch_model.bin"
    write(path)

    with pytest.raises(ModelError) as caught:
        read_pickle_index(path)

    assert fragment.format(path=path) in caught.value.message
    assert str(path) in caught.value.message


# --- memory ------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # merges of models made three times larger, or a 500 MB pickle: seconds each
def test_peak_memory_of_a_merge_of_pickle_sources_barely_grows_when_the_models_triple(tmp_path: Path) -> None:
    """The guard of test_memory_bound.py, for .bin sources: no model or shard is held in memory."""
    peaks, sizes = [], []
    for layers in (SMALLER_LAYERS, LARGER_LAYERS):
        base, experts = model_set(tmp_path / f"models{layers}", layers)
        twins = [pickle_twin(model, tmp_path / f"bin{layers}" / model.name) for model in (base, *experts)]
        for model in (base, *experts):
            shutil.rmtree(model)
        config = write_config(tmp_path / f"moe{layers}.yaml", twins[0], twins[1:], gate_mode="hidden", dtype="bfloat16")
        out = tmp_path / f"out{layers}"
        peaks.append(merge_peak_rss(config, out, tmp_path / f"peak{layers}"))
        sizes.append(output_bytes(out))

    size_growth = sizes[1] - sizes[0]
    assert size_growth > 100e6
    assert peaks[1] - peaks[0] < 0.2 * size_growth, (
        f"peak RSS went from {peaks[0] / 1e6:.0f} MB to {peaks[1] / 1e6:.0f} MB "
        f"while the output grew by {size_growth / 1e6:.0f} MB"
    )
