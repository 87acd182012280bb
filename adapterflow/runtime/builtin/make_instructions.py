"""Generate `instructions.jsonl`, the synthetic instruction dataset shipped for the demo.

    python -m adapterflow.runtime.builtin.make_instructions            # rewrites adapterflow/runtime/builtin/instructions.jsonl
    python -m adapterflow.runtime.builtin.make_instructions --check    # exit 1 if the shipped file differs

Each line is {"prompt": ..., "completion": ...}: a prompt ending in "->" and a completion starting with a space.
The tasks are small and rule-based (next / previous number, even or odd, bigger / smaller of two, counting,
letter after / before, uppercase, reversing, copying, first / last item) plus a few word facts (opposites,
plurals), each asked with a few templates: a tiny randomly initialised model with a LoRA adapter visibly learns
them in a few hundred steps, and held-out examples share their rule or fact with the training ones. The output depends on SEED only: running this script again
regenerates the file byte for byte (no sets, no hash order, no clock).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 1234
OUTPUT = Path(__file__).with_name("instructions.jsonl")

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("day", "night"),
    ("open", "shut"), ("full", "empty"), ("high", "low"), ("long", "short"), ("wet", "dry"), ("hard", "soft"),
    ("left", "right"), ("light", "dark"), ("rich", "poor"), ("early", "late"), ("happy", "sad"), ("in", "out"),
    ("yes", "no"), ("win", "lose"),
]
PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("bus", "buses"), ("child", "children"), ("mouse", "mice"),
    ("foot", "feet"), ("tooth", "teeth"), ("man", "men"), ("city", "cities"), ("leaf", "leaves"), ("fish", "fish"),
    ("sheep", "sheep"), ("goose", "geese"), ("star", "stars"), ("key", "keys"),
]
WORDS = ["cat", "dog", "sun", "red", "big", "hat", "cup", "box", "pen", "map", "egg", "bed", "car", "bus", "fox",
         "owl", "ant", "bee", "cow", "pig"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = ["*", "#", "@", "+"]

# task -> templates; {x} and {y} are filled by _facts. Several templates per task, so a held-out example shares
# its fact (not its wording) with training examples.
TEMPLATES = {
    "next": ["Next number after {x} ->", "What comes after {x}? ->", "{x} plus one ->"],
    "previous": ["Number before {x} ->", "{x} minus one ->"],
    "parity": ["Is {x} even or odd? ->", "Parity of {x} ->"],
    "bigger": ["Bigger of {x} and {y} ->", "Max({x}, {y}) ->"],
    "smaller": ["Smaller of {x} and {y} ->", "Min({x}, {y}) ->"],
    "count": ["Count the stars: {x} ->", "How many symbols: {x} ->"],
    "letter_next": ["Letter after {x} ->", "Next letter: {x} ->"],
    "letter_prev": ["Letter before {x} ->"],
    "upper": ["Uppercase: {x} ->", "Shout {x} ->"],
    "reverse": ["Reverse: {x} ->", "Backwards: {x} ->"],
    "copy": ["Repeat: {x} ->", "Say again: {x} ->"],
    "first": ["First item: {x} ->"],
    "last": ["Last item: {x} ->"],
    "opposite": ["Opposite of {x} ->", "The opposite of {x} is ->"],
    "plural": ["Plural of {x} ->", "One {x}, two ->"],
}


def _facts(rng: random.Random) -> list[tuple[str, dict, str]]:
    """(task, template arguments, answer) for every fact the dataset asks about."""
    out: list[tuple[str, dict, str]] = []
    for n in range(100):
        out.append(("next", {"x": n}, str(n + 1)))
        out.append(("previous", {"x": n + 1}, str(n)))
        out.append(("parity", {"x": n}, "even" if n % 2 == 0 else "odd"))
    for _ in range(120):
        x, y = rng.sample(range(100), 2)
        out.append(("bigger", {"x": x, "y": y}, str(max(x, y))))
        x, y = rng.sample(range(100), 2)
        out.append(("smaller", {"x": x, "y": y}, str(min(x, y))))
    for _ in range(120):
        k = rng.randint(1, 9)
        out.append(("count", {"x": " ".join(rng.choice(SYMBOLS) for _ in range(k))}, str(k)))
    for i, letter in enumerate(LETTERS):
        if i + 1 < len(LETTERS):
            out.append(("letter_next", {"x": letter}, LETTERS[i + 1]))
        if i > 0:
            out.append(("letter_prev", {"x": letter}, LETTERS[i - 1]))
        out.append(("upper", {"x": letter}, letter.upper()))
    for word in WORDS:
        out.append(("upper", {"x": word}, word.upper()))
    for _ in range(150):
        letters = rng.sample(LETTERS[:8], rng.randint(2, 4))
        out.append(("reverse", {"x": " ".join(letters)}, " ".join(reversed(letters))))
        items = rng.sample(WORDS, rng.randint(1, 3))
        out.append(("copy", {"x": " ".join(items)}, " ".join(items)))
        items = rng.sample(WORDS, 3)
        out.append(("first", {"x": " ".join(items)}, items[0]))
        items = rng.sample(WORDS, 3)
        out.append(("last", {"x": " ".join(items)}, items[-1]))
    for a, b in OPPOSITES:
        out.append(("opposite", {"x": a}, b))
        out.append(("opposite", {"x": b}, a))
    for singular, plural in PLURALS:
        out.append(("plural", {"x": singular}, plural))
    return out


def generate(seed: int = SEED) -> list[dict[str, str]]:
    """Every record, in the shipped order: each candidate asked with every template, duplicates dropped, shuffled."""
    rng = random.Random(seed)
    records, seen = [], set()
    for task, args, answer in _facts(rng):
        for template in TEMPLATES[task]:
            prompt = template.format(**args)
            if prompt not in seen:
                seen.add(prompt)
                records.append({"prompt": prompt, "completion": " " + answer})
    rng.shuffle(records)
    return records


def render(records: list[dict]) -> bytes:
    """The file's bytes: one compact JSON object per line, keys in a fixed order, ASCII only."""
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records).encode("ascii")


def write_or_check(argv: list[str] | None, records: list[dict], output: Path, description: str) -> int:
    """The command line of a builtin dataset generator: write `records` to --output, or with --check only compare
    (exit 1 when the file differs)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", type=Path, default=output, help=f"where to write (default: {output})")
    parser.add_argument("--check", action="store_true", help="only compare with the existing file")
    args = parser.parse_args(argv)
    data = render(records)
    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == data
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from the generator output'}")
        return 0 if same else 1
    args.output.write_bytes(data)
    print(f"wrote {len(data)} bytes, {len(data.splitlines())} lines to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return write_or_check(argv, generate(), OUTPUT, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
