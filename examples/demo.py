"""`make demo`: build small example models, merge them with a config from configs/, generate text.

Everything is made locally: the toy models are random-weight Mistral models sharing one base
(their MLPs differ, like fine-tunes) with Mistral's real tokenizer, so no download is needed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from frankenmoe.toymodels import ToyShape, write_toy_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
OUTPUT = ROOT / "examples" / "output"
TOY_SHAPE = ToyShape(
    hidden_size=128, num_hidden_layers=4, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2
)
TOY_EXPERTS = {"toy-chat": 1, "toy-code": 2, "toy-story": 3, "toy-math": 4}


def build_toy_models() -> None:
    if not (MODELS / "toy-base" / "model.safetensors").exists():
        write_toy_model(MODELS / "toy-base", shape=TOY_SHAPE)
    for name, seed in TOY_EXPERTS.items():
        if not (MODELS / name / "model.safetensors").exists():
            write_toy_model(MODELS / name, shape=TOY_SHAPE, mlp_seed=seed)


def merge(config: Path, out: Path) -> None:
    command = [sys.executable, "-m", "frankenmoe", "merge", str(config), str(out), "--force"]
    print("$", " ".join(command[2:]).replace("-m frankenmoe", "frankenmoe"), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def generate(out: Path, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(tokens[0], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", action="store_true", help="Use the random toy models (the default demo).")
    parser.parse_args()
    build_toy_models()
    out = OUTPUT / "toy-4x"
    merge(ROOT / "configs" / "toy-4x.yaml", out)
    print(f"\nThe merged checkpoint is in {out}")
    text = generate(out, "Write a Python function that")
    print(
        f"Generation (random toy weights, so the words are noise; it shows the checkpoint loads and runs):\n  {text!r}"
    )


if __name__ == "__main__":
    main()
