"""``math_answer``: 1.0 when the completion's final answer equals the ``answer`` column.

Extraction (first rule that finds something wins):

1. the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces kept whole: ``\\boxed{\\frac{1}{2}}``;
2. the text after the last ``####`` (GSM8K), up to the end of its line;
3. the text after the last "answer is" / "answer:" (case-insensitive), up to the end of the
   sentence;
4. the last number in the text (``-1,234.5``, ``3/4``).

Normalisation of both sides: strip ``$``, ``\\left``, ``\\right``, ``\\!``, ``\\,``, ``\\;``,
``\\text{..}``/``\\mathrm{..}`` wrappers (keeping their content), ``^\\circ``, a trailing period;
``\\dfrac``/``\\tfrac``/``\\frac{a}{b}`` -> ``a/b``; thousands separators (``1,234`` and ``1{,}234``).
Then, if it starts with a number (integer, decimal, or ``a/b``), the value is that number as an
exact fraction and whatever words follow are units and dropped (``12 cm`` -> 12); a trailing
``%`` marks a percentage, and ``50%`` equals both ``50`` and ``0.5``. So ``3/4``, ``\\frac{3}{4}`` and
``0.75`` are equal. Otherwise the answers are compared as strings without spaces, case-folded.

Score: 1.0 equal, 0.0 not equal or nothing extracted, None where the sample has no gold answer
(no ``answer`` column at all, or a None/empty entry).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from .contract import completion_text

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_LEADING = re.compile(rf"^({_NUMBER})(?:\s*/\s*({_NUMBER}))?\s*(%?)\s*(.*)$", re.DOTALL)
_ANY_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)
_UNITS = re.compile(r"^[^\W\d_][\w\s/^.\-]*$|^$")


def _braced(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``, nested braces included."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text`` by the rules in the module docstring, or None."""
    boxes = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*(?={)", text)]
    if boxes:
        return _braced(text, boxes[-1])
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else None
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip()
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _unwrap(text: str, command: str) -> str:
    while (i := text.find(command + "{")) >= 0:
        inner = _braced(text, i + len(command))
        if inner is None:
            break
        text = text[:i] + " " + inner + text[i + len(command) + len(inner) + 2:]
    return text


def _clean(text: str) -> str:
    s = text.strip()
    for cmd in (r"\text", r"\mathrm", r"\textbf", r"\mbox"):
        s = _unwrap(s, cmd)
    s = re.sub(r"\\[dt]?frac\s*{([^{}]*)}\s*{([^{}]*)}", r"(\1)/(\2)", s)
    s = re.sub(r"\\left|\\right|\\[!,;:]|\\ |\$", "", s)
    s = re.sub(r"\^\s*{?\\circ}?", "", s).replace("\\%", "%").replace("{,}", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\(\s*(" + _NUMBER + r")\s*\)", r"\1", s)  # (3)/(4) -> 3/4 after \frac
    return s.strip().rstrip(".").strip()


def normalize_answer(text: str) -> tuple[Fraction, bool] | str:
    """``(value, is_percent)`` for a number with optional units, else a canonical string."""
    s = _clean(text)
    m = _LEADING.match(s)
    if m and _UNITS.match(m.group(4).strip()):
        value = Fraction(m.group(1))
        if m.group(2) is not None:
            denominator = Fraction(m.group(2))
            if denominator == 0:
                return s.replace(" ", "").casefold()
            value /= denominator
        return value, m.group(3) == "%"
    return re.sub(r"\s+", "", s).casefold()


def answers_match(predicted: str, gold: str) -> bool:
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if isinstance(p, tuple) and isinstance(g, tuple):
        if p[0] == g[0]:
            return True
        # one side a percentage: 50% == 0.5
        return (p[1] and p[0] / 100 == g[0]) or (g[1] and g[0] / 100 == p[0])
    return p == g


def math_answer(prompts: Sequence[Any], completions: Sequence[Any],
                answer: Sequence[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """Math final-answer accuracy: 1.0 if the extracted answer equals the `answer` column."""
    if answer is None:
        return [None] * len(completions)
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if gold is None or not str(gold).strip():
            scores.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        scores.append(float(predicted is not None and answers_match(predicted, str(gold))))
    return scores


math_answer.required_columns = ("answer",)  # scored against the answer column
