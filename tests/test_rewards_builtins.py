"""Built-in rewards against hand-checked values."""

from __future__ import annotations

import pytest

from rewards.builtins import (
    format_regex,
    json_schema,
    json_valid,
    length_penalty,
    math_answer,
    soft_overlong_punishment,
    xml_tags,
)
from rewards.math_answer import extract_answer, normalize_answer


def call(fn, completions, **columns):
    return fn(["p"] * len(completions), list(completions), **columns)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}} and then \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    ("work...\n#### 1,234\nextra", "1,234"),
    ("Therefore the answer is 42 apples. Done", "42 apples"),
    ("Answer: -7", "-7"),
    ("first 3, then 7/2 remain", "7/2"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    ("#### 3/4", r"\frac{3}{4}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.8", 0.0),
    ("The answer is 1,234.", "1234", 1.0),
    (r"\boxed{1{,}000}", "1000", 1.0),
    (r"$\boxed{\left( 5 \right)}$", "5", 1.0),
    (r"\boxed{12\text{ cm}}", "12", 1.0),
    ("The answer is 18 dollars.", "18", 1.0),
    (r"\boxed{50\%}", "0.5", 1.0),
    ("The answer is 50%.", "50", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{-2\!.5}", "-5/2", 1.0),
    (r"\boxed{x^2 + 1}", "x^2+1", 1.0),
    (r"\boxed{x^2 + 2}", "x^2+1", 0.0),
    ("I think it's 6 or maybe 8", "8", 1.0),
    ("nothing to see", "8", 0.0),
])
def test_math_answer_values(completion, gold, expected):
    assert call(math_answer, [completion], answer=[gold]) == [expected]


def test_math_answer_none_without_gold_and_chat_completions():
    assert call(math_answer, ["#### 4", "#### 4"]) == [None, None]
    assert call(math_answer, ["#### 4", "#### 4"], answer=["4", None]) == [1.0, None]
    chat = [[{"role": "assistant", "content": r"\boxed{4}"}]]
    assert call(math_answer, chat, answer=["4.0"]) == [1.0]
    assert normalize_answer("3/4") == normalize_answer("0.75")


def test_format_regex_and_xml_tags_keep_readable_names():
    f = format_regex(r"^<think>.*</think>", name="think_first")
    assert f.__name__ == "think_first"
    assert call(f, ["<think>a\nb</think> 4", "4 <think></think>"]) == [1.0, 0.0]
    tags = xml_tags("think", "answer")
    assert tags.__name__ == "xml_tags_think_answer"
    assert call(tags, ["<think>\nhm\n</think>\n<answer>4</answer>\n",
                       "<answer>4</answer><think>x</think>",
                       "<think>x</think> 4",
                       "<think>x</think><answer>4</answer> trailing"]) == [1.0, 0.0, 0.0, 0.0]
    partial = xml_tags("think", "answer", partial=True)
    assert call(partial, ["<think>x</think> 4", "<think>x</think><answer>4</answer>", "4"]) == [
        0.5, 1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid tag name"):
        xml_tags("a b")


def test_length_penalty_and_soft_overlong_literal_values():
    ids = [[0] * n for n in (0, 50, 100, 150)]
    assert call(length_penalty(100), ["x"] * 4, completion_ids=ids) == [0.0, -0.5, -1.0, -1.0]
    overlong = soft_overlong_punishment(max_length=20, buffer=5)
    lengths = (10, 15, 16, 18, 20, 21)
    assert call(overlong, ["x"] * 6, completion_ids=[[0] * n for n in lengths]) == [
        0.0, 0.0, pytest.approx(-0.2), pytest.approx(-0.6), pytest.approx(-1.0), -1.0]
    with pytest.raises(ValueError, match="needs completion_ids"):
        call(overlong, ["x"])
    with pytest.raises(ValueError, match="buffer <= max_length"):
        soft_overlong_punishment(max_length=4, buffer=8)


def test_json_valid():
    texts = ['{"a": 1}', 'Here:\n```json\n[1, 2]\n```', "{'a': 1}", "", "3"]
    assert call(json_valid, texts) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_json_schema_fixed_and_from_column():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fixed = json_schema(schema)
    assert fixed.__name__ == "json_schema"
    assert call(fixed, ['{"n": 3}', '{"n": "3"}', "{}", "not json"]) == [1.0, 0.0, 0.0, 0.0]
    per_row = json_schema(column="schema")
    assert call(per_row, ['{"n": 3}', "[1]", "[1]"],
                schema=[schema, '{"type": "array"}', None]) == [1.0, 1.0, None]
    assert call(per_row, ['{"n": 3}']) == [None]
