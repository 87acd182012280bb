"""Generate `chat.jsonl`, the synthetic chat dataset shipped for the demo (`dataset.path=builtin:chat`).

    python -m adapterflow.runtime.builtin.make_chat            # rewrites adapterflow/runtime/builtin/chat.jsonl
    python -m adapterflow.runtime.builtin.make_chat --check    # exit 1 if the shipped file differs

Each line is {"messages": [{"role": ..., "content": ...}, ...]}: most conversations start with a system message,
then one to three user questions, each answered by the assistant. The questions and answers are the facts of
`make_instructions` (next number, parity, opposites, ...) without the "->" prompt marker, so the builtin tokenizer
(trained on instructions.jsonl) encodes them compactly and a tiny model with a LoRA adapter visibly learns the
assistant turns. The output depends on SEED only: running this script again regenerates the file byte for byte.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from adapterflow.runtime.builtin.make_instructions import TEMPLATES, _facts, write_or_check

SEED = 4321
OUTPUT = Path(__file__).with_name("chat.jsonl")
CONVERSATIONS = 1500
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer with one word or number.", "Be brief."]


def _questions(rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) for every fact, each asked with one of its templates."""
    pairs = []
    for task, args, answer in _facts(rng):
        template = rng.choice(TEMPLATES[task])
        pairs.append((template.format(**args).removesuffix(" ->").removesuffix("->").strip(), answer))
    return pairs


def generate(seed: int = SEED) -> list[dict]:
    """Every conversation, in the shipped order."""
    rng = random.Random(seed)
    pairs = _questions(rng)
    conversations = []
    for _ in range(CONVERSATIONS):
        messages = []
        if rng.random() < 0.8:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for question, answer in rng.sample(pairs, rng.randint(1, 3)):
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        conversations.append({"messages": messages})
    return conversations


def main(argv: list[str] | None = None) -> int:
    return write_or_check(argv, generate(), OUTPUT, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
