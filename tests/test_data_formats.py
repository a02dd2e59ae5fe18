"""Loading JSONL splits and validating every example, with file:line errors and skip reports."""

from __future__ import annotations

import json
import types

import pytest

from algorithms.data import DataError, load_split, prepare_dataset

GOOD_MSG = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}


def cfg(**kw):
    base = {"max_length": 64, "train_on": "auto", "skip_invalid": False}
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_directory_splits_and_blank_lines(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    (tmp_path / "valid.jsonl").write_text('{"text": "c"}\n')
    train = load_split(tmp_path, "train")
    assert [(r.line, r.data["text"]) for r in train] == [(1, "a"), (4, "b")]
    assert train[1].source == f"{tmp_path / 'train.jsonl'}:4"
    assert [r.data["text"] for r in load_split(tmp_path, "valid")] == ["c"]
    assert load_split(tmp_path, "test") is None


def test_missing_train_names_the_directory(tmp_path, tiny_tokenizer):
    (tmp_path / "valid.jsonl").write_text('{"text": "c"}\n')
    with pytest.raises(DataError, match=r"must contain train\.jsonl; it holds valid\.jsonl") as e:
        prepare_dataset(tmp_path, "train", tiny_tokenizer, cfg())
    assert str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset(tmp_path / "nope.jsonl", "train", tiny_tokenizer, cfg())


def test_single_file_is_only_a_train_split(write_jsonl, tiny_tokenizer):
    path = write_jsonl([{"text": "hello"}], "data.jsonl")
    assert len(prepare_dataset(path, "train", tiny_tokenizer, cfg())) == 1
    assert prepare_dataset(path, "valid", tiny_tokenizer, cfg()) is None


# (line written after a valid first line, rule, fragment of the message)
BAD = [
    ('{"text": "a"', "invalid_json", "not valid JSON"),
    ("[1, 2]", "not_an_object", "each line must be a JSON object"),
    ({"question": "a"}, "unknown_format", "got keys ['question']"),
    ({"messages": GOOD_MSG["messages"], "text": "x"}, "ambiguous_format", "exactly one of"),
    ({"prompt": "a"}, "missing_key", 'has "prompt" but no "completion"'),
    ({"prompt": "a", "completion": ["b"]}, "wrong_type", "got a string and a list"),
    ({**GOOD_MSG, "tols": []}, "unknown_key", "unknown key 'tols' (did you mean 'tools'?)"),
    ({"messages": "hi"}, "wrong_type", '"messages" must be a list'),
    ({"messages": ["hi"]}, "bad_message", '"messages"[0] must be an object with "role"'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown_role", 'role a string "bot"'),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
     "content_not_string", '"messages"[0] "content" must be a string; got a list'),
    ({"messages": [{"role": "user"}]}, "missing_key", '"messages"[0] has no "content"'),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn", "got roles user"),
    ({"messages": GOOD_MSG["messages"], "tools": {"a": 1}}, "wrong_type", '"tools" must be'),
    ({"messages": GOOD_MSG["messages"], "chat_template_kwargs": []}, "wrong_type",
     '"chat_template_kwargs" must be an object'),
    ('{"text": "\\ud800"}', "invalid_text", '"text" holds a lone surrogate'),
    ('{"messages": [{"role": "user", "content": "a\\udc00"}]}', "invalid_text",
     '"messages"[0]["content"] holds a lone surrogate'),
    ('{"text": "a", "text": "b"}', "duplicate_key", "key 'text' appears twice"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"function": {"arguments": {}}}]}]},
     "bad_tool_call", '"messages"[1] "tool_calls"[0] does not name its function'),
    ({"messages": [{"role": "user", "content": "x", "weight": 0},
                   {"role": "assistant", "content": "y"}]},
     "bad_weight", 'only an assistant turn of "messages" data may carry'),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y", "weight": 0.5}]},
     "bad_weight", '"weight" must be 0 (not trained) or 1'),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y", "weight": 0}]},
     "no_assistant_turn", 'every assistant turn of "messages" has "weight": 0'),
]


@pytest.mark.parametrize("bad,rule,fragment", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_every_rule_names_file_line_and_what_was_found(write_jsonl, tiny_tokenizer, bad, rule,
                                                       fragment):
    path = write_jsonl([GOOD_MSG, "", bad])  # the blank line still counts: bad is line 3
    with pytest.raises(DataError) as e:
        prepare_dataset(path, "train", tiny_tokenizer, cfg())
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert fragment in str(e.value)
    assert e.value.rule == rule


# rules that depend on the format of the example (first line of its own file)
BAD_FIRST = [
    ({"text": 3}, "wrong_type", '"text" must be a string; got a number 3'),
    ({"text": "  "}, "empty_text", '"text" is empty'),
    ({"prompt": "a", "completion": ""}, "empty_completion", '"completion" is empty'),
    ({"prompt": [], "completion": []}, "empty_prompt", '"prompt" is an empty message list'),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": []}, "empty_completion",
     '"completion" is an empty message list'),
    ({"prompt": [{"role": "user", "content": "a"}],
      "completion": [{"role": "user", "content": "b"}]}, "no_assistant_turn",
     '"completion" has no assistant turn'),
    ({"prompt": "a", "completion": "b", "tools": []}, "unknown_key", "unknown key 'tools'"),
    ({"text": "a", "id": 7, "meta": {"x": 1}, "source": "web"}, "unknown_key",
     "unknown key 'source' would be ignored; a \"text\" example takes text (and passes id, meta"),
]


@pytest.mark.parametrize("bad,rule,fragment", BAD_FIRST,
                         ids=[b[1] + str(i) for i, b in enumerate(BAD_FIRST)])
def test_format_specific_rules(write_jsonl, tiny_tokenizer, bad, rule, fragment):
    path = write_jsonl([bad])
    with pytest.raises(DataError) as e:
        prepare_dataset(path, "train", tiny_tokenizer, cfg())
    assert str(e.value).startswith(f"{path}:1: ")
    assert fragment in str(e.value), str(e.value)
    assert e.value.rule == rule


def test_mixed_formats_names_the_line_and_the_first_format(write_jsonl, tiny_tokenizer):
    path = write_jsonl([{"text": "a"}, {"text": "b"}, GOOD_MSG])
    with pytest.raises(DataError) as e:
        prepare_dataset(path, "train", tiny_tokenizer, cfg())
    assert str(e.value) == (f'{path}:3: this example is "messages" but the file\'s first example '
                            f'({path}:1) is "text"; one file holds one format')


def test_passthrough_keys_and_tool_call_turns_are_accepted(write_jsonl, tiny_tokenizer):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    path = write_jsonl([
        {"id": 1, "meta": {"src": "x"}, **GOOD_MSG},
        {"messages": [{"role": "user", "content": "q"}, call,
                      {"role": "tool", "content": "r", "tool_call_id": "0"},
                      {"role": "assistant", "content": "a"}], "tools": [{"name": "f"}],
         "chat_template_kwargs": {}},
    ])
    assert len(prepare_dataset(path, "train", tiny_tokenizer, cfg())) == 2


def test_skip_invalid_counts_by_rule_and_reports(write_jsonl, tiny_tokenizer):
    path = write_jsonl([
        {"text": "The sea is blue."},
        "not json",
        {"text": ""},
        {"text": "The sky is wide and the sea is blue, a very long line of words."},
        {"text": 1},
        "{}",
        {"text": "Hello!"},
    ])
    first_error = f"{path}:2: not valid JSON"
    with pytest.raises(DataError, match="not valid JSON") as e:
        prepare_dataset(path, "train", tiny_tokenizer, cfg())
    assert str(e.value).startswith(first_error)
    ds = prepare_dataset(path, "train", tiny_tokenizer, cfg(skip_invalid=True, max_length=10))
    r = ds.report
    assert [e.source for e in ds.examples] == [f"{path}:1", f"{path}:4", f"{path}:7"]
    assert r.n_examples == 3
    assert r.n_skipped_by_rule == {"empty_text": 1, "invalid_json": 1, "unknown_format": 1,
                                   "wrong_type": 1}
    assert r.n_skipped == 4 and r.n_truncated == 1
    assert r.n_tokens == sum(len(e) for e in ds.examples)
    assert r.n_loss_tokens == sum(len(e) - 1 for e in ds.examples)  # text: all but the first
    text = str(r)
    assert text.startswith(f'3 examples ("text") from {path}: {r.n_tokens} tokens, ')
    assert "1 truncated to 10 tokens" in text
    assert ("skipped 4 invalid examples (empty_text 1, invalid_json 1, unknown_format 1, "
            f"wrong_type 1), the first: {first_error}") in text
    assert "\n" not in text


def test_skip_invalid_with_nothing_left_is_an_error(write_jsonl, tiny_tokenizer):
    path = write_jsonl(["nope", {"text": ""}])
    with pytest.raises(DataError, match=r"no usable examples; all 2 were invalid, the first: "
                                        r".*:1:"):
        prepare_dataset(path, "train", tiny_tokenizer, cfg(skip_invalid=True))


def test_train_on_completion_refuses_text_even_when_skipping(write_jsonl, tiny_tokenizer):
    path = write_jsonl([{"text": "a"}])
    with pytest.raises(DataError, match="--train-on completion needs prompt/completion or "
                                        "messages data; this file is text"):
        prepare_dataset(path, "train", tiny_tokenizer, cfg(train_on="completion",
                                                            skip_invalid=True))


def test_records_keep_file_and_line(write_jsonl):
    path = write_jsonl(["", json.dumps({"text": "a"})])
    (record,) = load_split(path, "train")
    assert (record.file, record.line) == (str(path), 2)
