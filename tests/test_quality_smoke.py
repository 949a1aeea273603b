"""The quality benchmark's code paths on tiny random models: corpus splits, MLP-only and full
fine-tuning, merge, perplexity with routing counts, gain-retained arithmetic, the results tables
and the mergekit-moe config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from benchmarks.quality import run as quality_run
from benchmarks.quality.corpora import Document, code_documents, is_prose, maths_documents, token_blocks
from benchmarks.quality.evaluate import gain_retained
from benchmarks.quality.full_finetunes import MERGEKIT_NAME, SHARED_TRUNKS
from benchmarks.quality.full_finetunes import render_tables as render_full_tables
from benchmarks.quality.full_finetunes import variants as full_variants
from benchmarks.quality.mergekit_reference import mergekit_config
from benchmarks.quality.run import MAIN_SET, PROMPTS, Variant, merge_variant, render_tables
from benchmarks.quality.training import TRAINING_LOG, TrainingSettings, settings_record, train_mlp_expert
from frankenmoe.analysis.perplexity import ModelScore, score_folder
from frankenmoe.analysis.windows import TokenWindows
from frankenmoe.testing.toymodels import write_toy_model

PROSE = (
    "The package keeps its configuration in a single file under the system folder, and every change is "
    "read again when the service starts. Most users never need to edit it by hand.\n"
) * 12


def evaluate(folder: Path, blocks: torch.Tensor) -> ModelScore:
    """The benchmark's evaluator: frankenmoe's streamed one, every block scored whole."""
    return score_folder(folder, {"heldout": TokenWindows.whole(blocks)})["heldout"]


def write_fake_stdlib(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(40):
        module = root / f"module_{index}.py"
        module.write_text(f"def function_{index}(value):\n    return value * {index}\n")
    (root / "test").mkdir()
    (root / "test" / "test_module.py").write_text("assert True\n")
    return root


def test_code_split_is_by_file_disjoint_complete_and_skips_tests(tmp_path: Path) -> None:
    root = write_fake_stdlib(tmp_path)
    train = {document.name for document in code_documents("train", root)}
    heldout = {document.name for document in code_documents("heldout", root)}
    assert train and heldout
    assert not train & heldout
    assert train | heldout == {f"module_{index}.py" for index in range(40)}
    assert {document.name for document in code_documents("heldout", root)} == heldout


def test_maths_split_uses_disjoint_seeds_and_worked_answers() -> None:
    train = maths_documents("train", 50)
    heldout = maths_documents("heldout", 50)
    assert not {document.name for document in train} & {document.name for document in heldout}
    assert not {document.text for document in train} & {document.text for document in heldout}
    assert maths_documents("train", 50) == train
    assert all("Solution:" in document.text and "\nAnswer: " in document.text for document in train + heldout)


def test_prose_filter_keeps_sentences_and_drops_code() -> None:
    assert is_prose(PROSE)
    assert not is_prose("def f(x):\n    return {'a': [x, x + 1]}\n" * 60)
    assert not is_prose("short text")


def test_token_blocks_are_full_and_separated_by_end_of_text(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    documents = [Document("a", PROSE), Document("b", PROSE)]
    blocks = token_blocks(documents, tokenizer, 32)
    assert blocks.shape[1] == 32 and len(blocks) >= 2
    assert tokenizer.eos_token_id in blocks.flatten().tolist()
    assert len(token_blocks(documents, tokenizer, 32, max_blocks=2)) == 2


def test_gain_retained_arithmetic() -> None:
    assert gain_retained(10.0, 7.0, 6.0) == pytest.approx(0.75)
    assert gain_retained(10.0, 6.0, 6.0) == pytest.approx(1.0)
    assert gain_retained(10.0, 11.0, 6.0) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="no gain"):
        gain_retained(10.0, 9.0, 10.0)


@pytest.mark.slow  # the quality benchmark's whole pipeline: seconds each
def test_benchmark_pipeline_on_tiny_models(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    base = write_toy_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    code_blocks = token_blocks(code_documents("train", write_fake_stdlib(tmp_path / "lib")), tokenizer, 32)
    maths_blocks = token_blocks(maths_documents("train", 40), tokenizer, 32)
    settings = TrainingSettings(steps=2, batch_size=2, learning_rate=1e-3)
    experts = {
        "code": tmp_path / "code",
        "maths": tmp_path / "maths",
    }
    log = train_mlp_expert(base, experts["code"], code_blocks, settings)
    train_mlp_expert(base, experts["maths"], maths_blocks, settings)
    assert len(log.losses) == 2 and log.trainable_parameters > 0 and log.frozen_parameters > 0

    # Only the MLPs moved: everything else is bit-identical to the base.
    base_tensors = load_file(base / "model.safetensors")
    trained = load_file(experts["code"] / "model.safetensors")
    for name, tensor in base_tensors.items():
        same = torch.equal(tensor, trained[name])
        assert same != (".mlp." in name), name

    heldout = {"code": code_blocks[:2], "maths": maths_blocks[:2]}
    dense_maths = evaluate(experts["maths"], heldout["maths"])
    assert dense_maths.top1_share is None

    moe_folder = tmp_path / "moe"
    merge_variant(Variant("smoke", MAIN_SET, "hidden", "keyword"), base, experts, moe_folder)
    result = evaluate(moe_folder, heldout["maths"])
    assert result.tokens == 2 * 31
    assert result.top1_share is not None and len(result.top1_share) == 3
    assert sum(result.top1_share) == pytest.approx(1.0)
    assert torch.isfinite(torch.tensor(result.perplexity))

    # Both experts the same model: the MoE must compute exactly that model, so perplexities agree.
    same_folder = tmp_path / "same"
    merge_variant(
        Variant("same", "code+maths top-2", "hidden", "keyword"),
        base,
        {"code": experts["maths"], "maths": experts["maths"]},
        same_folder,
    )
    assert evaluate(same_folder, heldout["maths"]).perplexity == pytest.approx(dense_maths.perplexity, rel=1e-4)

    # MLP-only logs keep their old settings record (no `trained` key), so cached experts stay valid.
    assert "trained" not in json.loads((experts["code"] / TRAINING_LOG).read_text())["settings"]


@pytest.mark.slow  # a training run: seconds each
def test_full_fine_tune_trains_everything_but_the_embeddings(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    base = write_toy_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    maths_blocks = token_blocks(maths_documents("train", 40), tokenizer, 32)
    settings = TrainingSettings(steps=2, batch_size=2, learning_rate=1e-3, trained="full")
    log = train_mlp_expert(base, tmp_path / "full", maths_blocks, settings)
    assert json.loads((tmp_path / "full" / TRAINING_LOG).read_text())["settings"] == settings_record(settings)
    assert settings_record(settings)["trained"] == "full"
    base_tensors = load_file(base / "model.safetensors")
    trained = load_file(tmp_path / "full" / "model.safetensors")
    for name, tensor in base_tensors.items():
        frozen = "embed_tokens." in name or "lm_head." in name
        assert torch.equal(tensor, trained[name]) == frozen, name
    assert log.trainable_parameters + log.frozen_parameters == sum(t.numel() for t in base_tensors.values())
    with pytest.raises(ValueError, match="trained must be"):
        train_mlp_expert(base, tmp_path / "bad", maths_blocks, TrainingSettings(steps=1, trained="attention"))

    # A merge of base + the full fine-tune (twice, as code and maths) keeps only its MLPs: the shared
    # tensors are the base's, so the MoE is not the fine-tune, but the merge runs and scores.
    moe_folder = tmp_path / "moe"
    variant = full_variants()[0]
    merge_variant(variant, base, {"code": tmp_path / "full", "maths": tmp_path / "full"}, moe_folder)
    result = evaluate(moe_folder, maths_blocks[:2])
    assert result.top1_share is not None and len(result.top1_share) == 3


def test_full_variants_and_mergekit_config(tmp_path: Path) -> None:
    names = [variant.name for variant in full_variants()]
    assert names[:2] == [f"{MAIN_SET} | fit | keyword | shared: base", f"{MAIN_SET} | hidden | keyword | shared: base"]
    assert len(names) == len(SHARED_TRUNKS) + 1 and len(set(names)) == len(names)
    by_name = {variant.name: variant for variant in full_variants()}
    folders = {"code": tmp_path / "c", "maths": tmp_path / "m"}
    config = by_name[f"{MAIN_SET} | fit | keyword | shared: task_arithmetic lambda=1.0"].config(tmp_path, folders)
    assert config["shared_weights"] == {"method": "task_arithmetic", "lambda": 1.0}
    assert config["experts_per_token"] == 2 and config["gate_mode"] == "fit"
    assert "shared_weights" not in full_variants()[0].config(tmp_path / "base", {"code": tmp_path, "maths": tmp_path})

    reference = mergekit_config(
        tmp_path / "base", {"code": tmp_path / "c", "maths": tmp_path / "m"}, PROMPTS["keyword"]
    )
    assert reference["gate_mode"] == "hidden" and reference["experts_per_token"] == 2
    assert [expert["source_model"] for expert in reference["experts"]] == [
        str(tmp_path / "base"),
        str(tmp_path / "c"),
        str(tmp_path / "m"),
    ]
    assert reference["experts"][1]["positive_prompts"] == list(PROMPTS["keyword"]["code"])


def test_results_table_reports_gain_retained() -> None:
    def entry(code: float, maths: float, prose: float, shares: list[float] | None = None) -> dict:
        values = {"code": code, "maths": maths, "prose": prose}
        return {
            domain: {"perplexity": value, "tokens": 100, **({"top1_share": shares} if shares else {})}
            for domain, value in values.items()
        }

    results = {
        "eval_blocks": 1,
        "gate_modes": ["hidden"],
        "dense": {"base": entry(10, 8, 20), "code expert": entry(6, 8, 21), "maths expert": entry(10, 4, 21)},
        "merges": {"m": entry(7, 5, 20, [0.2, 0.5, 0.3])},
    }
    table = render_tables(results)
    assert "| m | 7.000 | 5.000 | 20.000 | 75% | 75% | +0.0% |" in table
    assert "0.20 / 0.50 / 0.30" in table

    full = {
        "eval_blocks": 1,
        "dense": {
            "base": entry(10, 8, 20),
            "code full fine-tune": entry(5, 8, 21),
            "maths full fine-tune": entry(10, 2, 21),
        },
        "merges": {"f": entry(6, 5, 19, [0.2, 0.5, 0.3]), MERGEKIT_NAME: entry(9, 7, 22, [0.1, 0.1, 0.8])},
        "failures": {"other tool": "Traceback ...\nImportError: no module named x"},
    }
    full_table = render_full_tables(full)
    assert "| f | 6.000 | 5.000 | 19.000 | 80% | 50% | -5.0% | 0.20 / 0.50 / 0.30 |" in full_table
    assert f"| {MERGEKIT_NAME} | 9.000 | 7.000 | 22.000 | 20% | 17% | +10.0% |" in full_table
    assert "other tool: failed: `ImportError: no module named x`" in full_table
    full["dense"]["code full fine-tune"] = entry(11, 8, 21)  # worse than the base on code: no gain to keep
    assert "| f | 6.000 | 5.000 | 19.000 | n/a | 50% |" in render_full_tables(full)


def test_results_file_keeps_each_benchmarks_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality_run, "RESULTS_TABLE", tmp_path / "results.md")
    quality_run.write_results("mlp grid\n", None)
    assert (tmp_path / "results.md").read_text() == "mlp grid\n"
    quality_run.write_results(None, "## Full fine-tunes\n")
    quality_run.write_results("new mlp grid\n", None)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("new mlp grid\n") and text.endswith("## Full fine-tunes\n")
    assert text.count(quality_run.FULL_SECTION_MARKER) == 1
    quality_run.write_results(None, "## Full fine-tunes, again\n")
    assert (tmp_path / "results.md").read_text().startswith("new mlp grid\n")
    assert (tmp_path / "results.md").read_text().endswith("again\n")
