"""Built-in synthetic data sets with a realistic spread of lengths (no tokenizer, no network).

Chat SFT examples (``{"messages": [...]}``) and preference pairs (``{"prompt", "chosen",
"rejected"}``) whose lengths in words are log-normal (median ``median_words``, log-sd
``sigma``), clipped to ``[min_words, max_words]``: most examples short, a long tail, like real
instruction data. Roughly 1.3 tokens per word with SmolLM2's tokenizer, so the chat defaults
(median 110, max 380 words) give about 20-500 tokens, a few truncated at ``--max-length 512``.
Preference pairs draw the chosen completion's length (median 60, 15-150 words: about 20-200
tokens, as in public preference sets), the prompt's separately (median 25, 4-100 words) and the
rejected one at 0.6-1.2x the chosen. ``arith`` is online-RL prompts: conversational arithmetic
questions with an ``answer`` column for the ``math_answer`` reward. The same seed writes the
same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number",
    "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil",
    "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part",
    "model", "training", "data", "answer", "question", "explain", "simple", "example", "result",
    "value", "function", "system", "learning", "gradient", "memory", "token", "sequence",
    "batch", "layer", "weight", "matrix", "vector", "error", "loss", "step", "river", "mountain",
    "city", "garden", "window", "kitchen", "morning", "evening", "music", "story", "letter",
    "market",
)
SYSTEMS = ("You are a helpful assistant.", "Answer briefly and precisely.",
           "You are a careful tutor who explains each step.")


def example_lengths(n: int, seed: int = 0, median_words: int = 110, sigma: float = 0.75,
                    min_words: int = 12, max_words: int = 380) -> list[int]:
    """Word counts of ``n`` examples: log-normal around ``median_words``, clipped."""
    import math

    rng = random.Random(seed)
    mu = math.log(median_words)
    return [max(min_words, min(max_words, round(rng.lognormvariate(mu, sigma))))
            for _ in range(n)]


def _sentence(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        k = min(left, rng.randint(5, 14))
        sentence = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!."))
        left -= k
    return " ".join(out)


def chat_example(rng: random.Random, words: int) -> dict:
    """One conversation of about ``words`` words; a quarter of them two turns long."""
    turns = 2 if words > 80 and rng.random() < 0.25 else 1
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
    per_turn = words // turns
    for _ in range(turns):
        user = max(3, int(per_turn * rng.uniform(0.15, 0.4)))
        messages.append({"role": "user", "content": _sentence(rng, user)})
        messages.append({"role": "assistant", "content": _sentence(rng, max(3, per_turn - user))})
    return {"messages": messages}


def preference_example(rng: random.Random, words: int) -> dict:
    """A pair whose chosen completion has ``words`` words; the prompt's length is drawn apart."""
    import math

    prompt = max(4, min(100, round(rng.lognormvariate(math.log(25), 0.7))))
    return {"prompt": _sentence(rng, prompt), "chosen": _sentence(rng, words),
            "rejected": _sentence(rng, max(12, int(words * rng.uniform(0.6, 1.2))))}


def arith_example(rng: random.Random, words: int) -> dict:
    """A conversational arithmetic prompt and its answer (``words`` is not used)."""
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    op, value = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
    style = rng.choice(("Reply with the number only.", "Think briefly, then give the number.",
                        "Show your working, then end with the answer."))
    return {"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {style}"}],
            "answer": str(value)}


KINDS = {"chat": chat_example, "preference": preference_example, "arith": arith_example}
# length distribution (in words) of each kind's examples: see example_lengths
LENGTHS = {"chat": {}, "arith": {},
           "preference": {"median_words": 60, "sigma": 0.6, "min_words": 15, "max_words": 150}}


def write_synthetic(out_dir: str | Path, kind: str = "chat", n_train: int = 256,
                    n_valid: int = 16, seed: int = 0, **length_kw) -> Path:
    """Write ``train.jsonl`` and ``valid.jsonl`` of ``kind`` (chat | preference) into out_dir."""
    if kind not in KINDS:
        raise ValueError(f"synthetic data kind {kind!r}: must be one of {', '.join(KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make = KINDS[kind]
    for split, n, offset in (("train", n_train, 0), ("valid", n_valid, 1)):
        rng = random.Random(seed * 1000 + offset)
        lengths = example_lengths(n, seed * 1000 + offset, **{**LENGTHS[kind], **length_kw})
        rows = [make(rng, w) for w in lengths]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
