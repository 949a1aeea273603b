"""Local, deterministic corpora for the quality benchmark: Python code, maths word problems, prose.

Nothing is downloaded. Every split is decided by something fixed before training:
- code: the Python standard library of the interpreter running this script, split by file (a
  file's path hash decides train or held-out, so no file is in both);
- maths: seeded synthetic word problems with worked answers, split by seed range;
- prose (the general-text control, used by no expert for training): English documentation text
  files under /usr/share/doc (README, FAQ and .txt files, deduplicated, prose-like ones only).
"""

from __future__ import annotations

import gzip
import hashlib
import random
import sysconfig
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 15
"""Share of stdlib files kept out of training (by path hash)."""
MATHS_HELDOUT_SEED_OFFSET = 1_000_000
"""Held-out maths problems use seeds from here on; training uses seeds below it."""
SKIPPED_STDLIB_PARTS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
DOC_ROOT = Path("/usr/share/doc")
DOC_NAME_PATTERNS = ("README*", "FAQ*", "*.txt", "*.txt.gz")
DOCS_PER_PACKAGE = 3
"""git alone ships hundreds of release notes; a cap per package keeps the control text varied."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(split: str, root: Path | None = None) -> list[Document]:
    """Python source files of the standard library (no tests), one document per file, sorted by path."""
    _check_split(split)
    folder = root or stdlib_root()
    documents = []
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder)
        if SKIPPED_STDLIB_PARTS.intersection(relative.parts):
            continue
        if _split_of(str(relative)) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(Document(str(relative), text))
    return documents


def _split_of(name: str) -> str:
    return "heldout" if zlib.crc32(name.encode()) % 100 < HELDOUT_PERCENT else "train"


def maths_documents(split: str, count: int) -> list[Document]:
    """`count` word problems with worked answers; train and held-out use disjoint seed ranges."""
    _check_split(split)
    first_seed = 0 if split == "train" else MATHS_HELDOUT_SEED_OFFSET
    return [Document(f"problem-{seed}", maths_problem(seed)) for seed in range(first_seed, first_seed + count)]


NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Maya")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "eggs")


def maths_problem(seed: int) -> str:
    """One word problem and its step-by-step solution, fully determined by `seed`."""
    rng = random.Random(seed)
    template = MATHS_TEMPLATES[rng.randrange(len(MATHS_TEMPLATES))]
    return template(rng)


def _buy_and_give(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, packs, per_pack, given = rng.randint(5, 60), rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    bought = packs * per_pack
    total = start + bought
    return (
        f"Problem: {name} has {start} {item}. {name} buys {packs} packs with {per_pack} {item} in each pack, "
        f"then gives {given} {item} to a friend. How many {item} does {name} have now?\n"
        f"Solution: The packs hold {packs} x {per_pack} = {bought} {item}. "
        f"After buying, {name} has {start} + {bought} = {total} {item}. "
        f"After giving {given} away, {name} has {total} - {given} = {total - given} {item}.\n"
        f"Answer: {total - given}\n"
    )


def _unit_price(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price, paid = rng.randint(2, 15), rng.randint(2, 25), 0
    cost = count * price
    paid = (cost // 50 + 1) * 50
    return (
        f"Problem: {item.capitalize()} cost ${price} each. {name} buys {count} of them and pays with ${paid}. "
        f"How much change does {name} get?\n"
        f"Solution: The {item} cost {count} x ${price} = ${cost}. "
        f"The change is ${paid} - ${cost} = ${paid - cost}.\n"
        f"Answer: {paid - cost}\n"
    )


def _speed(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    speed, hours, extra = rng.randint(20, 90), rng.randint(2, 8), rng.randint(5, 60)
    distance = speed * hours
    return (
        f"Problem: {name} drives at {speed} km per hour for {hours} hours, then another {extra} km. "
        f"How far does {name} drive in total?\n"
        f"Solution: In {hours} hours at {speed} km per hour, {name} covers {speed} x {hours} = {distance} km. "
        f"Adding the last part gives {distance} + {extra} = {distance + extra} km.\n"
        f"Answer: {distance + extra}\n"
    )


def _rectangle(rng: random.Random) -> str:
    width, length = rng.randint(3, 40), rng.randint(3, 40)
    area, perimeter = width * length, 2 * (width + length)
    return (
        f"Problem: A garden is {length} metres long and {width} metres wide. "
        f"What are its area and its perimeter?\n"
        f"Solution: The area is {length} x {width} = {area} square metres. "
        f"The perimeter is 2 x ({length} + {width}) = 2 x {length + width} = {perimeter} metres.\n"
        f"Answer: area {area}, perimeter {perimeter}\n"
    )


def _percentage(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    price, percent = rng.randint(2, 40) * 10, rng.choice((10, 20, 25, 30, 40, 50))
    discount = price * percent // 100
    return (
        f"Problem: A jacket costs ${price}. The shop takes {percent}% off. "
        f"How much does {name} pay for the jacket?\n"
        f"Solution: {percent}% of ${price} is {price} x {percent} / 100 = ${discount}. "
        f"{name} pays ${price} - ${discount} = ${price - discount}.\n"
        f"Answer: {price - discount}\n"
    )


def _ages(rng: random.Random) -> str:
    first, second = rng.sample(NAMES, 2)
    age, difference, years = rng.randint(4, 30), rng.randint(2, 25), rng.randint(2, 15)
    older = age + difference
    return (
        f"Problem: {first} is {age} years old. {second} is {difference} years older than {first}. "
        f"How old will {second} be in {years} years?\n"
        f"Solution: {second} is now {age} + {difference} = {older} years old. "
        f"In {years} years {second} will be {older} + {years} = {older + years}.\n"
        f"Answer: {older + years}\n"
    )


def _sharing(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, left = rng.randint(2, 9), rng.randint(2, 15), 0
    left = rng.randint(0, friends - 1)
    total = friends * each + left
    return (
        f"Problem: {name} shares {total} {item} equally among {friends} friends and keeps the rest. "
        f"How many does each friend get, and how many are left?\n"
        f"Solution: {total} divided by {friends} is {each} with remainder {left}, "
        f"because {friends} x {each} = {friends * each} and {total} - {friends * each} = {left}.\n"
        f"Answer: {each} each, {left} left\n"
    )


def _work_rate(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    per_hour, hours, days = rng.randint(3, 20), rng.randint(2, 8), rng.randint(2, 6)
    per_day = per_hour * hours
    return (
        f"Problem: {name} paints {per_hour} tiles per hour and works {hours} hours a day. "
        f"How many tiles does {name} paint in {days} days?\n"
        f"Solution: Each day {name} paints {per_hour} x {hours} = {per_day} tiles. "
        f"In {days} days that is {per_day} x {days} = {per_day * days} tiles.\n"
        f"Answer: {per_day * days}\n"
    )


MATHS_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    _buy_and_give,
    _unit_price,
    _speed,
    _rectangle,
    _percentage,
    _ages,
    _sharing,
    _work_rate,
)


def prose_documents(root: Path = DOC_ROOT) -> list[Document]:
    """English documentation text under /usr/share/doc: deduplicated, prose-like files, sorted by path,
    at most DOCS_PER_PACKAGE per package."""
    seen: set[str] = set()
    per_package: dict[str, int] = {}
    documents = []
    paths = sorted({path for pattern in DOC_NAME_PATTERNS for path in root.rglob(pattern) if path.is_file()})
    for path in paths:
        text = _read_text(path)
        digest = hashlib.sha256(text.encode()).hexdigest()
        package = path.relative_to(root).parts[0]
        if digest in seen or per_package.get(package, 0) >= DOCS_PER_PACKAGE or not is_prose(text):
            continue
        seen.add(digest)
        per_package[package] = per_package.get(package, 0) + 1
        documents.append(Document(str(path.relative_to(root)), text))
    return documents


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def is_prose(text: str, minimum_characters: int = 1500) -> bool:
    """Mostly letters and spaces, in lines that read like sentences: keeps READMEs, drops tables and code."""
    if len(text) < minimum_characters:
        return False
    letters = sum(character.isalpha() or character == " " for character in text)
    lines = [line for line in text.splitlines() if line.strip()]
    sentence_lines = sum(len(line.split()) >= 6 for line in lines)
    return letters / len(text) > 0.85 and sentence_lines / max(len(lines), 1) > 0.6


def token_blocks(
    documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Documents joined by the end-of-text token and cut into [blocks, block_size] token ids.

    The tail shorter than a block is dropped, so every block is full and every token is scored alike.
    """
    separator = tokenizer.eos_token_id
    if separator is None:
        raise ValueError("The tokenizer has no end-of-text token to separate documents with.")
    blocks: list[list[int]] = []
    buffer: list[int] = []
    for ids in _encoded(documents, tokenizer):
        buffer.extend([*ids, separator])
        while len(buffer) >= block_size:
            blocks.append(buffer[:block_size])
            buffer = buffer[block_size:]
            if max_blocks is not None and len(blocks) == max_blocks:
                return torch.tensor(blocks, dtype=torch.long)
    if not blocks:
        raise ValueError(f"The documents hold fewer than {block_size} tokens; no block could be made.")
    return torch.tensor(blocks, dtype=torch.long)


def _encoded(documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    for document in documents:
        yield tokenizer(document.text, add_special_tokens=False)["input_ids"]


def spread_documents(documents: Sequence[Document], seed: int) -> list[Document]:
    """The documents in a seeded shuffled order, so a prefix of blocks samples many files, not the first few."""
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
