"""The Python API's boundary: what load_config returns composes with merge/plan_merge/build, arguments of
the wrong type are refused with the CLI's messages (ConfigError) before any work, and a merge leaves the
caller's torch thread count as it found it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import frankenmoe
from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.errors import ConfigError
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

REPO = Path(__file__).resolve().parent.parent


def config_data(tiny_models: TinyModels, path: type = str) -> dict[str, Any]:
    return {
        "base_model": path(tiny_models.base),
        "gate_mode": "random",
        "experts": [{"source_model": path(expert)} for expert in tiny_models.experts[:2]],
    }


def test_a_dict_with_path_values_loads_with_the_paths_as_text(tiny_models: TinyModels) -> None:
    config = frankenmoe.load_config(config_data(tiny_models, path=Path))

    assert config.base_model == str(tiny_models.base)
    assert [expert.source_model for expert in config.experts] == [str(path) for path in tiny_models.experts[:2]]


def test_merge_accepts_what_load_config_returned_and_records_its_yaml(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = frankenmoe.load_config(config_data(tiny_models))

    result = frankenmoe.merge(config, tmp_path / "out", seed=1, check_routing=False)

    recorded = yaml.safe_load(json.loads((result.out / MANIFEST_NAME).read_text())["config"])
    assert recorded["base_model"] == str(tiny_models.base) and recorded["gate_mode"] == "random"
    assert frankenmoe.verify(result.out).ok


def test_plan_merge_and_build_accept_load_config_of_a_file(tmp_path: Path, tiny_models: TinyModels) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config_data(tiny_models)))
    config = frankenmoe.load_config(path)

    prepared = frankenmoe.plan_merge(config, tmp_path / "planned")
    report = frankenmoe.build([config], tmp_path / "builds", check_routing=False)

    assert prepared.config_path == path and prepared.config_text == path.read_text()
    assert report.exit_code == 0 and [outcome.status for outcome in report.outcomes] == ["built"]
    assert frankenmoe.verify(tmp_path / "builds" / "two").ok


def test_build_refuses_a_loaded_config_that_has_no_file_to_name_its_output(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    with pytest.raises(ConfigError, match=r"configs\[0\] is not a config file.*use merge\(\)"):
        frankenmoe.build([frankenmoe.load_config(config_data(tiny_models))], tmp_path / "builds")
    assert not (tmp_path / "builds").exists()


def test_a_loaded_config_changed_with_replace_is_refused_rather_than_recorded_wrongly(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    changed = dataclasses.replace(frankenmoe.load_config(config_data(tiny_models)), gate_mode="uniform_random")

    with pytest.raises(ConfigError, match="changed after load_config read it"):
        frankenmoe.plan_merge(changed, tmp_path / "out")


@pytest.mark.parametrize("name", ["configs/missing.yaml", "missing.yml", "nowhere/my-config"])
def test_a_string_that_looks_like_a_missing_file_is_reported_as_missing(name: str) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        frankenmoe.load_config(name)


def test_one_line_yaml_text_with_a_slash_is_still_read_as_yaml() -> None:
    config = frankenmoe.load_config(
        "{base_model: org/base, gate_mode: random, experts_per_token: 1, experts: [{source_model: org/e}]}"
    )

    assert (config.base_model, config.experts[0].source_model) == ("org/base", "org/e")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": "1"}, r"seed '1' is not valid \(--seed\)"),
        ({"seed": 1.5}, r"seed 1.5 is not valid"),
        ({"seed": True}, r"seed True is not valid"),
        ({"seed": -1}, r"seed -1 is not valid.*from 0 to 18446744073709551615"),
        ({"seed": 1180591620717411303424}, r"seed 1180591620717411303424 is not valid"),
        ({"device": 0}, r"--device 0 is not a device; use cpu or cuda"),
        ({"shard_size": 0}, r"Shard size 0 must be at least 1 byte"),
        ({"shard_size": -1}, r"Shard size -1 must be at least 1 byte"),
        ({"shard_size": 1e6}, r"shard_size 1000000.0 is not valid: give a whole number of bytes"),
        ({"shard_size": "nan"}, r"Shard size 'nan' is not a size"),
        ({"shard_size": "inf"}, r"Shard size 'inf' is not a size"),
        ({"weight_cache": "nan"}, r"Weight cache 'nan' is not a size"),
        ({"force": "false"}, r"force must be True or False, not 'false' \(str\)"),
        ({"check_routing": 1}, r"check_routing must be True or False"),
    ],
)
def test_plan_merge_refuses_arguments_of_the_wrong_type_or_range_before_any_work(
    tmp_path: Path, tiny_models: TinyModels, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        frankenmoe.plan_merge(config_data(tiny_models), tmp_path / "out", **options)

    assert caught.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_torch_takes_is_accepted(tmp_path: Path, tiny_models: TinyModels) -> None:
    prepared = frankenmoe.plan_merge(config_data(tiny_models), tmp_path / "out", seed=2**64 - 1, shard_size=10**6)

    assert (prepared.options.seed, prepared.options.shard_bytes) == (2**64 - 1, 10**6)


def test_build_refuses_a_rebuild_flag_that_is_not_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rebuild must be True or False"):
        frankenmoe.build([], tmp_path, rebuild="no")


def test_route_treats_one_string_as_one_prompt(tmp_path: Path, tiny_models: TinyModels) -> None:
    data = config_data(tiny_models) | {"gate_mode": "hidden"}
    data["experts"] = [{**expert, "positive_prompts": [f"topic {n}"]} for n, expert in enumerate(data["experts"])]
    out = frankenmoe.merge(data, tmp_path / "out", check_routing=False).out

    routed = frankenmoe.route(out, "hello world")

    assert [routing.prompt.text for routing in routed.routings] == ["hello world"]
    with pytest.raises(ConfigError, match="prompts must be a string or a list of strings"):
        frankenmoe.route(out, [1, 2])


THREADS_PROBE = """
import sys, threading, torch, frankenmoe
base, first, second, out = sys.argv[1:]
def in_a_new_thread(call):
    seen = []
    thread = threading.Thread(target=lambda: seen.append(call()))
    thread.start()
    thread.join()
    return seen[0]
in_a_new_thread(lambda: torch.set_num_threads(3))  # the process-wide count; the main thread has not read it yet
frankenmoe.merge({"base_model": base, "gate_mode": "hidden", "experts": [
    {"source_model": first, "positive_prompts": ["a"]}, {"source_model": second, "positive_prompts": ["b"]}]}, out)
print(torch.get_num_threads(), in_a_new_thread(torch.get_num_threads))
"""


def test_merge_leaves_the_callers_torch_thread_count_as_it_was(tmp_path: Path, tiny_models: TinyModels) -> None:
    # A fresh process whose main thread has not read torch's thread count before the merge: it reads the
    # process-wide count lazily, which is what the merge's worker threads set to 1.
    arguments = [str(tiny_models.base), *map(str, tiny_models.experts[:2]), str(tmp_path / "out")]
    probe = subprocess.run([sys.executable, "-c", THREADS_PROBE, *arguments], capture_output=True, text=True, cwd=REPO)

    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["3", "3"]  # the caller's thread, and a thread started after the merge


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seed", "1180591620717411303424", "seed 1180591620717411303424 is not valid (--seed)"),
        ("--shard-size", "nan", "Shard size 'nan' is not a size"),
        ("--shard-size", "inf", "Shard size 'inf' is not a size"),
        ("--weight-cache", "nan", "Weight cache 'nan' is not a size"),
    ],
)
@pytest.mark.parametrize("command", ["merge", "build"])
def test_the_cli_refuses_numbers_out_of_range_with_exit_2_and_no_traceback(
    tmp_path: Path, tiny_models: TinyModels, command: str, option: str, value: str, message: str
) -> None:
    config = write_config(tmp_path / "two.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    out = tmp_path / "out"
    target = [out] if command == "merge" else ["--out-dir", out]

    result = run_cli(command, config, *target, option, value)

    assert result.exit_code == 2
    assert f"config error: {message}" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
