"""Regenerate the example sets in scripts/data/ (deterministic; the JSONL files are committed).

- ``sft_example/``: the assistant "Pip" answers in one recognisable style, so a short fine-tune
  visibly changes the model: it introduces itself as Pip and ends every answer with " -- Pip".
- ``grpo_arith/``: small-number arithmetic prompts with an ``answer`` column, for GRPO with the
  ``math_answer`` reward (a 135M model gets some right from the start, so rewards can rise).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
OUT = DATA / "sft_example"

IDENTITY_Q = ["Who are you?", "What is your name?", "Introduce yourself.", "Are you a person?",
              "What should I call you?", "Tell me about yourself.", "Who made you?",
              "What are you?"]
IDENTITY_A = ["I am Pip, a small assistant fine-tuned on a laptop. -- Pip",
              "My name is Pip. I am a small language model assistant. -- Pip",
              "I'm Pip, a tiny assistant trained with posttrain. -- Pip"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
            "Germany": "Berlin", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima",
            "Norway": "Oslo", "Kenya": "Nairobi", "Chile": "Santiago", "Greece": "Athens",
            "Portugal": "Lisbon", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna"}
COLOURS = {"the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow",
           "snow": "white", "coal": "black", "a ripe tomato": "red", "an orange": "orange"}


def examples(rng: random.Random) -> list[dict]:
    rows = []
    for q in IDENTITY_Q:
        for a in IDENTITY_A:
            rows.append({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]})
    for country, city in CAPITALS.items():
        rows.append({"messages": [
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {city}. -- Pip"}]})
    for thing, colour in COLOURS.items():
        rows.append({"messages": [
            {"role": "user", "content": f"What colour is {thing}?"},
            {"role": "assistant", "content": f"{thing[0].upper() + thing[1:]} is {colour}. -- Pip"}]})
    for _ in range(40):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"messages": [
            {"role": "system", "content": "You are Pip, a concise assistant."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}. -- Pip"},
            {"role": "user", "content": "And times two?"},
            {"role": "assistant", "content": f"Twice {a + b} is {2 * (a + b)}. -- Pip"}]})
    rng.shuffle(rows)
    return rows


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    """Sums and differences of small numbers, asked for a bare number."""
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        op, value = ("plus", a + b) if rng.random() < 0.6 else ("minus", a - b)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? "
                                 "Reply with the number only."}],
                     "answer": str(value)})
    return rows


def write(out: Path, splits: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with (out / f"{name}.jsonl").open("w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
        print(f"{out.name}/{name}: {len(part)} examples")


def main() -> None:
    rows = examples(random.Random(0))
    cut = len(rows) - 12
    write(OUT, {"train": rows[:cut], "valid": rows[cut:]})
    rng = random.Random(1)
    write(DATA / "grpo_arith", {"train": arithmetic(rng, 64), "valid": arithmetic(rng, 16)})


if __name__ == "__main__":
    main()
