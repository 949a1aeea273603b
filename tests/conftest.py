"""Session-wide tiny models: a Mistral base, three MLP "fine-tunes" of it, and a tied-embedding Llama."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from frankenmoe.checkpoint import output_folder as output
from frankenmoe.testing.toymodels import write_toy_model

_BASE_TEMP: list[Path] = []
_SCRATCH: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the run that is not a test's own folder (subprocesses' scratch, such as a merge
    killed by a test that cannot clean up after itself, and caches torch makes on import) goes into one scratch
    folder, removed when the run ends. pytest's own folders stay where they were, kept for failed tests."""
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    scratch = Path(tempfile.mkdtemp(prefix="frankenmoe-tests-"))
    _SCRATCH.append(scratch)
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None  # read TMPDIR again


@pytest.fixture(scope="session", autouse=True)
def remembers_pytests_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    _BASE_TEMP.append(tmp_path_factory.getbasetemp())


@pytest.hookimpl(trylast=True)  # after pytest's own temp-folder bookkeeping
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A passing run leaves nothing in the system temp folder (pytest would keep module-scoped folders)."""
    for scratch in _SCRATCH:
        shutil.rmtree(scratch, ignore_errors=True)
    if exitstatus == 0:
        for base in _BASE_TEMP:
            shutil.rmtree(base, ignore_errors=True)
            with contextlib.suppress(OSError):
                base.parent.rmdir()  # pytest-of-<user>, when no earlier run is kept there


@dataclass(frozen=True)
class TinyModels:
    base: Path
    experts: tuple[Path, ...]
    llama_tied: Path
    llama_tied_experts: tuple[Path, ...]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    base = write_toy_model(root / "base")
    experts = tuple(write_toy_model(root / f"expert{index}", mlp_seed=index) for index in (1, 2, 3))
    llama = write_toy_model(root / "llama-tied", model_type="llama", tie_word_embeddings=True, base_seed=7)
    llama_experts = tuple(
        write_toy_model(
            root / f"llama-tied-expert{index}",
            model_type="llama",
            tie_word_embeddings=True,
            base_seed=7,
            mlp_seed=70 + index,
        )
        for index in (1, 2)
    )
    return TinyModels(base, experts, llama, llama_experts)


@pytest.fixture
def ctrl_c_during_the_swap(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ctrl-C arrives as every output swap starts (tests/test_signals.py, builds in test_recovery_and_build_defects)."""
    # A shell that starts the tests in the background (`nohup make test &`) leaves SIGINT ignored;
    # these tests are about Python's usual Ctrl-C handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    swap = output._swap_into_place

    def swap_with_ctrl_c(*args: object) -> None:
        signal.raise_signal(signal.SIGINT)
        swap(*args)

    monkeypatch.setattr(output, "_swap_into_place", swap_with_ctrl_c)
    yield
    signal.signal(signal.SIGINT, previous)
