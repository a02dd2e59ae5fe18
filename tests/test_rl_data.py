"""Prompt datasets for online RL: formats, columns, rules, and the seeded prompt stream."""

from __future__ import annotations

import json
import types

import pytest

from algorithms.data import DataError
from algorithms.rl.data import PromptStream, prepare_prompt_dataset


def _cfg(**kw):
    base = {"max_length": 64, "max_completion_length": 16, "skip_invalid": False}
    return types.SimpleNamespace(**{**base, **kw})


def _write(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_string_and_message_prompts(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, [
        {"prompt": "2+2=", "answer": "4"},
        {"prompt": [{"role": "user", "content": "say red"}], "answer": "red"},
        {"prompt": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "Sure,"}],
         "answer": "x"},
    ])
    ds = prepare_prompt_dataset(path, "train", tiny_tokenizer, _cfg())
    plain, chat, seeded = ds.examples
    # a string prompt is tokenised as it is, no chat template
    assert plain.prompt_ids == tiny_tokenizer("2+2=")["input_ids"]
    assert plain.columns == {"answer": "4"} and plain.source.endswith("train.jsonl:1")
    # a conversation ends with the template's generation prompt
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "say red"}],
                                              tokenize=False, add_generation_prompt=True)
    assert chat.prompt_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # a final assistant turn is continued, not closed
    decoded = tiny_tokenizer.decode(seeded.prompt_ids)
    assert decoded.endswith("Sure,")
    assert ds.report.columns == ["answer"] and ds.report.n_examples == 3


@pytest.mark.parametrize("rows, rule, words", [
    ([{"question": "x"}], "missing_key", 'needs a "prompt"'),
    ([{"prompt": "  "}], "empty_prompt", "empty"),
    ([{"prompt": 3}], "wrong_type", "string or a message list"),
    ([{"prompt": [{"role": "robot", "content": "x"}]}], "unknown_role", "robot"),
    ([{"prompt": "a", "completions": "x"}], "reserved_column", "'completions'"),
    ([{"prompt": "a", "answer": 1}, {"prompt": "b"}], "missing_column", "'answer'"),
    ([{"prompt": "a"}, {"prompt": "b", "answer": 1}], "unknown_column", "'answer'"),
    ([{"prompt": "word " * 60}], "prompt_too_long", "leaves 48"),
    (["{not json"], "invalid_json", "not valid JSON"),
])
def test_rules_name_file_line_and_rule(tmp_path, tiny_tokenizer, rows, rule, words):
    path = _write(tmp_path, rows)
    with pytest.raises(DataError) as info:
        prepare_prompt_dataset(path, "train", tiny_tokenizer, _cfg())
    assert info.value.rule == rule
    assert f"train.jsonl:{len(rows)}:" in str(info.value) and words in str(info.value)


def test_skip_invalid_counts_by_rule(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, [{"prompt": "ok"}, {"prompt": ""}, {"prompt": 1}, {"prompt": "ok 2"}])
    ds = prepare_prompt_dataset(path, "train", tiny_tokenizer, _cfg(skip_invalid=True))
    assert len(ds) == 2
    assert ds.report.n_skipped_by_rule == {"empty_prompt": 1, "wrong_type": 1}
    assert "skipped 2" in str(ds.report)


def test_no_room_for_a_prompt_is_an_error(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, [{"prompt": "a"}])
    with pytest.raises(DataError, match="--max-completion-length 64"):
        prepare_prompt_dataset(path, "train", tiny_tokenizer, _cfg(max_completion_length=64))


def test_prompt_stream_is_seeded_and_resumable(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, [{"prompt": f"p{i}"} for i in range(5)])
    ds = prepare_prompt_dataset(path, "train", tiny_tokenizer, _cfg())
    stream = PromptStream(ds, seed=3)
    first = [e.prompt for e in stream.take(7)]  # crosses into the second epoch
    assert sorted(first[:5]) == [f"p{i}" for i in range(5)]  # an epoch is a permutation
    assert stream.cursor == {"epoch": 1, "index": 2}
    rest = [e.prompt for e in stream.take(3)]
    resumed = PromptStream(ds, seed=3, epoch=1, index=2)
    assert [e.prompt for e in resumed.take(3)] == rest
    again = PromptStream(ds, seed=3)
    assert [e.prompt for e in again.take(7)] == first
    assert [e.prompt for e in PromptStream(ds, seed=4).take(5)] != first[:5]
