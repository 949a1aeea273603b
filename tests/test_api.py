"""The public Python API on tiny models: every function, config as a dict, YAML text or a file, errors
with their exit codes, the build record and `verify`."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import yaml

import frankenmoe
from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from tests.conftest import TinyModels
from tests.support import write_config


def config_data(tiny_models: TinyModels, gate_mode: str = "random") -> dict:
    return {
        "base_model": str(tiny_models.base),
        "gate_mode": gate_mode,
        "experts": [
            {"source_model": str(expert), "positive_prompts": [f"topic {index}"]}
            for index, expert in enumerate(tiny_models.experts[:2])
        ],
    }


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> frankenmoe.MergeResult:
    out = tmp_path_factory.mktemp("api") / "out"
    return frankenmoe.merge(config_data(tiny_models, "hidden"), out, seed=3)


def test_merge_from_a_dict_returns_files_parameters_architecture_timings_and_the_routing_check(
    merged: frankenmoe.MergeResult,
) -> None:
    assert merged.architecture == "mixtral"
    names = [file.name for file in merged.files]
    assert names[0] == "model-00001-of-00001.safetensors" and "config.json" in names and "README.md" in names
    for file in merged.files:
        assert (merged.out / file.name).stat().st_size == file.size
    assert merged.total_parameters >= merged.active_parameters > 0  # two experts, both active per token
    assert {"planning", "writing", "verifying", "routing_check", "total"} <= set(merged.timings)
    assert merged.routing_check is not None and merged.routing_check.prompts == 2
    assert merged.laser_results == ()


def test_the_manifest_hashes_equal_sha256sum_of_the_files(merged: frankenmoe.MergeResult) -> None:
    manifest = json.loads((merged.out / MANIFEST_NAME).read_text())

    for record in manifest["files"]:
        data = (merged.out / record["name"]).read_bytes()
        assert record == {"name": record["name"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    listed = {record["name"] for record in manifest["files"]}
    assert listed == {path.name for path in merged.out.iterdir()} - {MANIFEST_NAME}


def test_the_manifest_records_version_config_sources_and_byte_changing_options(
    merged: frankenmoe.MergeResult, tiny_models: TinyModels
) -> None:
    manifest = merged.manifest

    assert manifest["frankenmoe_version"] == frankenmoe.__version__
    assert yaml.safe_load(manifest["config"])["gate_mode"] == "hidden"
    assert len(manifest["config_sha256"]) == 64
    assert manifest["options"]["seed"] == 3 and manifest["options"]["architecture"] == "mixtral"
    assert [source["role"] for source in manifest["sources"]] == ["base", "experts[0]", "experts[1]"]
    base_files = {file["name"]: file for file in manifest["sources"][0]["files"]}
    weights = tiny_models.base / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    size = len(data)
    sampled = data[: 8 + length] + b"".join(data[size * block // 16 :][: 64 * 1024] for block in range(16))
    assert base_files["model.safetensors"] == {
        "name": "model.safetensors",
        "size": size,
        "sampled_sha256": hashlib.sha256(sampled).hexdigest(),
    }
    assert manifest["peak_rss_bytes"] > 0 and manifest["timings_s"]["total"] > 0


def test_config_as_yaml_text_and_as_a_file_give_the_same_plan(tmp_path: Path, tiny_models: TinyModels) -> None:
    data = config_data(tiny_models)
    text = yaml.safe_dump(data, sort_keys=False)
    file = tmp_path / "config.yaml"
    file.write_text(text)

    from_text = frankenmoe.plan_merge(text, tmp_path / "a")
    from_file = frankenmoe.plan_merge(file, tmp_path / "b")
    from_string_path = frankenmoe.plan_merge(str(file), tmp_path / "c")

    assert from_text.plan.jobs == from_file.plan.jobs == from_string_path.plan.jobs
    assert from_file.config_path == file and from_text.config_path is None
    assert from_text.out == tmp_path / "a" and not (tmp_path / "a").exists()
    assert frankenmoe.load_config(text) == frankenmoe.load_config(data) == frankenmoe.load_config(file)


def test_a_planned_merge_runs_with_the_out_and_options_it_was_planned_with(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    prepared = frankenmoe.plan_merge(
        config_data(tiny_models), tmp_path / "out", seed=5, dtype="float16", check_routing=False
    )

    result = frankenmoe.run_merge(prepared)

    assert result.out == tmp_path / "out" and result.routing_check is None
    assert result.manifest["options"]["seed"] == 5 and result.manifest["options"]["dtype"] == "float16"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_errors_are_the_tools_exception_family_with_exit_codes(tmp_path: Path, tiny_models: TinyModels) -> None:
    with pytest.raises(frankenmoe.ConfigError) as config_error:
        frankenmoe.merge({"base_model": str(tiny_models.base), "experts": []}, tmp_path / "out")
    assert config_error.value.exit_code == 2 and "`experts` is empty" in config_error.value.message

    broken = {**config_data(tiny_models), "base_model": str(tmp_path / "missing")}
    with pytest.raises(frankenmoe.ModelError) as model_error:
        frankenmoe.plan_merge(broken, tmp_path / "out")
    assert model_error.value.exit_code == 3

    with pytest.raises(frankenmoe.ConfigError, match="layout 'diagonal' is not valid"):
        frankenmoe.plan_merge(config_data(tiny_models), tmp_path / "out", layout="diagonal")
    assert not (tmp_path / "out").exists()


def test_inspect_and_route_return_the_dataclasses_the_cli_renders(merged: frankenmoe.MergeResult) -> None:
    report = frankenmoe.inspect(merged.out)
    assert (report.num_experts, report.layout, len(report.routers)) == (2, "classic", 2)

    routed = frankenmoe.route(merged.out, ["topic 0", "topic 1"], labels=[0, 1])
    assert len(routed.routings) == 2 and routed.routings[0].probabilities.shape[-1] == 2
    assert routed.summary.utilisation.shape == (2, 2)
    assert routed.accuracy is not None and 0.0 <= routed.accuracy.prompt_accuracy <= 1.0


def test_the_api_prints_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_models: TinyModels) -> None:
    frankenmoe.merge(config_data(tiny_models), tmp_path / "out")
    frankenmoe.inspect(tmp_path / "out")
    frankenmoe.verify(tmp_path / "out")

    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


@pytest.fixture()
def fresh_output(tmp_path: Path, tiny_models: TinyModels) -> Path:
    config = write_config(tmp_path / "config.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    return frankenmoe.merge(config, tmp_path / "out", shard_size="150KB").out


def test_verify_passes_on_an_untouched_output(fresh_output: Path) -> None:
    report = frankenmoe.verify(fresh_output)

    assert report.ok, report.problems
    assert report.files_checked >= 5 and report.tensors_checked > 10


def test_verify_detects_one_flipped_byte_in_a_shard(fresh_output: Path) -> None:
    shard = sorted(fresh_output.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))

    problems = frankenmoe.verify(fresh_output).problems
    assert problems == (f"{shard.name}: sha256 differs from the manifest's (the file was changed or damaged)",)


def test_verify_detects_a_missing_shard(fresh_output: Path) -> None:
    shard = sorted(fresh_output.glob("model-*.safetensors"))[0]
    shard.unlink()

    problems = frankenmoe.verify(fresh_output).problems
    assert f"{shard.name}: missing (the manifest lists it)" in problems
    assert any("listed in the index, in no shard" in problem or shard.name in problem for problem in problems[1:])


def test_verify_detects_an_extra_tensor(fresh_output: Path) -> None:
    from safetensors.torch import load_file, save_file

    shard = sorted(fresh_output.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    tensors["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = next(iter(tensors.values())).clone()
    save_file(tensors, shard, {"format": "pt"})

    problems = frankenmoe.verify(fresh_output).problems
    assert any(problem.startswith(f"{shard.name}: ") for problem in problems)
    assert "model.layers.0.block_sparse_moe.experts.9.w1.weight: an extra tensor mixtral has no place for" in problems


def test_verify_detects_an_edited_config(fresh_output: Path) -> None:
    config = json.loads((fresh_output / "config.json").read_text())
    config["num_local_experts"] = 3
    (fresh_output / "config.json").write_text(json.dumps(config))

    problems = frankenmoe.verify(fresh_output).problems
    assert problems[0].startswith("config.json: ")
    assert any("router" in problem or "gate.weight" in problem for problem in problems[1:])


def test_verify_refuses_a_folder_without_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(frankenmoe.ModelError, match=f"has no {MANIFEST_NAME}"):
        frankenmoe.verify(tmp_path)


def test_from_python_readme_example_runs(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    config = write_config(tmp_path / "my-moe.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    monkeypatch.chdir(tmp_path)
    assert config.exists()

    exec(compile(code, "README.md (From Python)", "exec"), {})

    assert frankenmoe.verify(tmp_path / "my-moe").ok
