"""Random-weight Mistral models for the merge benchmark: a base and N "fine-tunes", cached on disk.

    python benchmarks/synthetic_models.py --shape large --experts 4

Models go to benchmarks/.cache/<shape>/ (git-ignored) and are reused while complete: a marker file
is written only after every model of the set is on disk, so an interrupted run regenerates. Like
the checkpoints users download, every folder carries the fast tokenizer's tokenizer.json next to
the SentencePiece tokenizer.model: without it, transformers converts tokenizer.model on every load
(0.5-1.5 s each time on this machine), a cost real merges do not pay.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from frankenmoe.testing.toymodels import SHAPES, write_toy_model

CACHE = Path(__file__).resolve().parent / ".cache"
MARKER = "complete.json"


@dataclass(frozen=True)
class ModelSet:
    base: Path
    experts: tuple[Path, ...]

    @property
    def folders(self) -> tuple[Path, ...]:
        return (self.base, *self.experts)

    def weight_files(self) -> list[Path]:
        return [folder / "model.safetensors" for folder in self.folders]


def model_set(shape_name: str, expert_count: int, cache: Path = CACHE) -> ModelSet:
    """The base and expert folders of one shape, generating them unless a complete set is cached."""
    root = cache / shape_name
    models = ModelSet(root / "base", tuple(root / f"expert{index}" for index in range(1, expert_count + 1)))
    description = {"shape": asdict(SHAPES[shape_name]), "experts": expert_count, "dtype": "bfloat16"}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == description:
        add_fast_tokenizer(models)
        return models
    shutil.rmtree(root, ignore_errors=True)
    # Same base_seed everywhere: experts share the base's attention, norms and embeddings and differ
    # only in their MLPs, like real fine-tunes of one base model.
    write_toy_model(models.base, shape=SHAPES[shape_name], dtype="bfloat16", base_seed=0)
    for index, folder in enumerate(models.experts, start=1):
        write_toy_model(folder, shape=SHAPES[shape_name], dtype="bfloat16", base_seed=0, mlp_seed=index)
    add_fast_tokenizer(models)
    marker.write_text(json.dumps(description) + "\n")
    return models


def add_fast_tokenizer(models: ModelSet) -> None:
    """Write tokenizer.json (the converted tokenizer.model) into every folder that lacks one."""
    missing = [folder for folder in models.folders if not (folder / "tokenizer.json").is_file()]
    if not missing:
        return
    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(str(models.base)).backend_tokenizer
    for folder in missing:
        converted.save(str(folder / "tokenizer.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable; default: small, large")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the folders as JSON (for the benchmark)")
    args = parser.parse_args()
    for shape_name in args.shape or ["small", "large"]:
        models = model_set(shape_name, args.experts)
        if args.json:
            print(
                json.dumps({"shape": shape_name, "base": str(models.base), "experts": list(map(str, models.experts))})
            )
            continue
        size = sum(path.stat().st_size for path in models.weight_files())
        print(f"{shape_name}: {len(models.folders)} models, {size / 1e9:.2f} GB in {models.base.parent}")


if __name__ == "__main__":
    main()
