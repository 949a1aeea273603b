"""llama.cpp's own runtime for the slow tests: built once from the pinned source tree, then run on GGUF files.

The source is the llama.cpp tree vendored in the llama-cpp-python 0.3.36 sdist (`vendor/llama.cpp/`, the
same tree whose converter tests/llama_cpp.py uses). `tools()` downloads that sdist with pip on first use,
unpacks the tree and builds `llama-perplexity`, `llama-completion` and `llama-quantize` with cmake (CPU
only, Release, no curl, two jobs: 10-20 minutes on two cores) into a cache outside the repository,
`~/.cache/frankenmoe/llama.cpp-0.3.36/` (`FRANKENMOE_LLAMA_CPP_CACHE` moves it), and later runs reuse
the binaries. A marker written after a complete build records what was built, so an interrupted build
is redone rather than trusted. Any failure raises `LlamaCppBuildError` with the command and its output:
the slow tests fail with it instead of being skipped.

`perplexity()` and `greedy()` run the tools the way the tests compare them with transformers: an f32 KV
cache (`-ctk f32 -ctv f32`, so the cache rounds nothing that transformers keeps in float32), one sequence
per chunk, greedy sampling (temperature 0, top-k 1) with end-of-generation tokens ignored.

`python -m tests.llama_cpp_runtime` builds (or finds) the tools and prints their folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.llama_cpp import LLAMA_CPP_PYTHON_VERSION, ConverterFetchError, download_sdist, unpack_llama_cpp

CACHE = Path(
    os.environ.get(
        "FRANKENMOE_LLAMA_CPP_CACHE", Path.home() / ".cache" / "frankenmoe" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    )
)
TARGETS = ("llama-perplexity", "llama-completion", "llama-quantize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)
JOBS = 2
MARKER = "built.json"
BUILD_TIMEOUT = 3600
"""Seconds: the measured build takes 10-20 minutes on two busy cores."""


class LlamaCppBuildError(RuntimeError):
    """llama.cpp could not be fetched or built; the message has the command and its output."""


def tools() -> Path:
    """The folder holding the built llama.cpp programs (TARGETS), built on first use."""
    binaries = CACHE / "bin"
    description = {
        "sdist": f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        "targets": list(TARGETS),
        "cmake": list(CMAKE_OPTIONS),
    }
    marker = CACHE / MARKER
    if (
        marker.is_file()
        and json.loads(marker.read_text()) == description
        and all((binaries / t).is_file() for t in TARGETS)
    ):
        return binaries
    CACHE.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    source = CACHE / "src"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="download-") as scratch:
            staging = Path(scratch) / "src"
            try:
                unpack_llama_cpp(download_sdist(Path(scratch)), staging)
            except ConverterFetchError as error:
                raise LlamaCppBuildError(str(error)) from error
            shutil.rmtree(source, ignore_errors=True)
            staging.rename(source)
    build = CACHE / "build"
    _run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build),
            "-G",
            "Ninja" if shutil.which("ninja") else "Unix Makefiles",
            *CMAKE_OPTIONS,
        ]
    )
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(JOBS), "--target", *TARGETS])
    binaries.mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build / "bin" / target, binaries / target)
    marker.write_text(json.dumps(description) + "\n")
    return binaries


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LlamaCppBuildError(f"Could not build llama.cpp: `{' '.join(command)}` failed: {error}") from error
    if result.returncode != 0:
        raise LlamaCppBuildError(
            f"Could not build llama.cpp (needs cmake and a C++17 compiler): `{' '.join(command)}` exited with "
            f"{result.returncode}.\n{(result.stdout + result.stderr).strip()[-4000:]}"
        )


THREADS = 2
RUN_TIMEOUT = 900
COMMON_FLAGS = ("-ctk", "f32", "-ctv", "f32", "-t", str(THREADS), "-tb", str(THREADS))
PERPLEXITY_ATTEMPTS = 3


@dataclass(frozen=True)
class Perplexity:
    """What llama-perplexity measured, and the exact token windows it scored."""

    value: float
    n_ctx: int
    tokens: np.ndarray
    """Its tokenisation of the text (BOS first when the vocabulary adds one), the first chunks * n_ctx tokens,
    before it puts BOS at the start of each window."""
    log: str


def _run_tool(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"`{' '.join(command)}` took over {RUN_TIMEOUT} s") from error
    if result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(command)}` exited with {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
        )
    return result.stdout + "\n" + result.stderr


def perplexity(model: Path, text: Path, n_ctx: int, chunks: int, scratch: Path) -> Perplexity:
    """llama-perplexity over the first `chunks` windows of `n_ctx` tokens of `text` (one window per batch).

    It scores, in each window, the tokens after its first half (positions n_ctx/2 + 1 .. n_ctx - 1);
    `--kl-divergence-base` makes it also save its tokens, read back here, so a comparison uses its windows.
    """
    saved = scratch / f"{model.stem}.llama-logits"
    command = [
        str(tools() / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
        "-ub", str(n_ctx), "--chunks", str(chunks), "--kl-divergence-base", str(saved), *COMMON_FLAGS,
    ]  # fmt: skip
    # llama.cpp's logger writes from a thread of its own, and a process that exits right after its last line can
    # lose it (seen once in ~40 runs on a loaded machine: "[1]...," then exit 0 with no final estimate). The
    # computation is deterministic, so a run whose log lost the estimate is simply run again.
    for _ in range(PERPLEXITY_ATTEMPTS):
        log = _run_tool(command)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
        if found:
            break
    assert found, f"llama-perplexity printed no final estimate in {PERPLEXITY_ATTEMPTS} runs:\n{log[-4000:]}"
    with saved.open("rb") as file:
        assert file.read(8) == b"_logits_"
        saved_ctx, _vocab, saved_chunks = np.fromfile(file, dtype=np.int32, count=3)
        tokens = np.fromfile(file, dtype=np.int32, count=int(saved_chunks) * int(saved_ctx))
    saved.unlink()  # n_ctx * vocab log-probabilities per chunk: not needed here
    assert (saved_ctx, saved_chunks) == (n_ctx, chunks), log[-4000:]
    return Perplexity(float(found.group(1)), n_ctx, tokens, log)


def greedy(model: Path, prompt: str, new_tokens: int) -> str:
    """What llama-completion prints on stdout: `prompt` and its greedy continuation of exactly `new_tokens` tokens
    (its log goes to stderr)."""
    command = [
        str(tools() / "llama-completion"), "-m", str(model), "-p", prompt, "-n", str(new_tokens), "--temp", "0",
        "--top-k", "1", "--ignore-eos", "-no-cnv", "-c", "512", "-s", "1", *COMMON_FLAGS,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"`{' '.join(command)}` took over {RUN_TIMEOUT} s") from error
    if result.returncode != 0:
        raise AssertionError(f"`{' '.join(command)}` exited with {result.returncode}:\n{result.stderr[-6000:]}")
    return result.stdout


if __name__ == "__main__":
    print(tools())
