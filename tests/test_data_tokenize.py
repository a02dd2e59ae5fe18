"""Token ids and loss masks for every format and --train-on mode, truncation, render_prompt."""

from __future__ import annotations

import copy
import types

import pytest

from algorithms.data import DataError, prepare_dataset, render_prompt

MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four, café ☕"},
]}


def cfg(**kw):
    base = {"max_length": 256, "train_on": "auto", "skip_invalid": False}
    base.update(kw)
    return types.SimpleNamespace(**base)


def one(write_jsonl, tok, record, **kw):
    ds = prepare_dataset(write_jsonl([record]), "train", tok, cfg(**kw))
    (example,) = ds.examples
    assert len(example.input_ids) == len(example.loss_mask)
    return example


def trained_text(tok, example) -> str:
    return tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


def test_text_appends_eos_and_trains_every_target(write_jsonl, tiny_tokenizer):
    ex = one(write_jsonl, tiny_tokenizer, {"text": "hello world"})
    # literal ids of the deterministic tiny tokenizer; 2 is <|im_end|> (its eos)
    assert ex.input_ids == [261, 294, 81, 274, 283, 78, 70, 2]
    assert ex.loss_mask == [0, 1, 1, 1, 1, 1, 1, 1]  # the first token is never a target


def test_string_prompt_completion_trains_completion_and_eos(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": "What is two plus two?", "completion": " Four."}
    ex = one(write_jsonl, tok, rec)
    prompt = tok("What is two plus two?")["input_ids"]
    completion = tok(" Four.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt + completion + [tok.eos_token_id]
    assert ex.loss_mask == [0] * len(prompt) + [1] * (len(completion) + 1)
    assert trained_text(tok, ex) == " Four.<|im_end|>"
    assert one(write_jsonl, tok, rec, train_on="completion").loss_mask == ex.loss_mask
    every = one(write_jsonl, tok, rec, train_on="all")
    assert every.loss_mask == [0] + [1] * (len(ex.input_ids) - 1)


def test_messages_train_every_assistant_turn_and_only_them(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    ex = one(write_jsonl, tok, MULTI_TURN)
    assert tok.decode(ex.input_ids) == (
        "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is two plus two?"
        "<|im_end|>\n<|im_start|>assistant\nFour, café ☕<|im_end|>\n")
    assert trained_text(tok, ex) == "Hello!<|im_end|>Four, café ☕<|im_end|>"
    # the trained tokens form exactly two contiguous runs, each ending on the end-of-turn token
    runs, start = [], None
    for i, m in enumerate(ex.loss_mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            runs.append((start, i))
            start = None
    assert [tok.decode(ex.input_ids[a:b]) for a, b in runs] == ["Hello!<|im_end|>",
                                                                "Four, café ☕<|im_end|>"]
    assert ex.input_ids[runs[0][1]] == tok.convert_tokens_to_ids("Ċ")  # "\n" after it: not trained
    assert one(write_jsonl, tok, MULTI_TURN, train_on="completion").loss_mask == ex.loss_mask
    every = one(write_jsonl, tok, MULTI_TURN, train_on="all")
    assert every.input_ids == ex.input_ids
    assert every.loss_mask == [0] + [1] * (len(ex.input_ids) - 1)


def test_a_turn_with_weight_0_is_context_not_trained(write_jsonl, tiny_tokenizer):
    """OpenAI's fine-tuning format: "weight": 0 on an assistant turn (it used to be ignored)."""
    tok = tiny_tokenizer
    record = copy.deepcopy(MULTI_TURN)
    first = next(m for m in record["messages"] if m["role"] == "assistant")
    first["weight"] = 0
    assert trained_text(tok, one(write_jsonl, tok, record)) == "Four, café ☕<|im_end|>"
    first["weight"] = 1
    assert one(write_jsonl, tok, record).loss_mask == one(write_jsonl, tok, MULTI_TURN).loss_mask


def test_chat_prompt_completion_trains_after_the_generation_prompt(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": [{"role": "system", "content": "Be nice."},
                      {"role": "user", "content": "Hi"}],
           "completion": [{"role": "assistant", "content": "Hello!"}]}
    ex = one(write_jsonl, tok, rec)
    assert tok.decode(ex.input_ids).endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
    assert trained_text(tok, ex) == "Hello!<|im_end|>"


def test_tool_calls_are_trained_tool_results_are_not(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}],
        "tools": [{"type": "function", "function": {"name": "weather"}}]}
    ex = one(write_jsonl, tok, rec)
    assert "You can call these tools:" in tok.decode(ex.input_ids)
    assert trained_text(tok, ex) == ('<tool_call>\n{"name": "weather", "arguments": '
                                     '{"city": "Paris"}}\n</tool_call><|im_end|>'
                                     "It is sunny.<|im_end|>")


def test_template_that_is_not_prefix_stable_is_refused(write_jsonl, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # renders the final turn differently (as templates that strip earlier reasoning do)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r":1: the chat template is not prefix-stable: rendering "
                                        r"messages\[:1\] with add_generation_prompt=True") as e:
        one(write_jsonl, tok, {"messages": [{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "b"}]})
    assert e.value.rule == "template_not_prefix_stable"


def test_chat_template_kwargs_reach_the_template(write_jsonl, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if greeting %}{{ greeting }}{% endif %}{% for m in messages %}"
                         "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
           "chat_template_kwargs": {"greeting": "Hello "}}
    ex = one(write_jsonl, tok, rec)
    assert tok.decode(ex.input_ids).startswith("Hello <|im_start|>user")
    assert trained_text(tok, ex) == "b<|im_end|>"


def test_chat_data_needs_a_chat_template(write_jsonl, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = write_jsonl([MULTI_TURN])
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        prepare_dataset(path, "train", tok, cfg(skip_invalid=True))


def test_truncation_keeps_the_start_and_is_counted(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    long_text = "The quick brown fox jumps over the lazy dog. " * 4
    ds = prepare_dataset(write_jsonl([{"text": long_text}, {"text": "Hi"}]), "train", tok,
                         cfg(max_length=8))
    full = tok(long_text)["input_ids"]
    assert ds.examples[0].input_ids == full[:8] and ds.examples[0].truncated
    assert not ds.examples[1].truncated
    assert ds.report.n_truncated == 1


def test_fully_masked_after_truncation_names_the_line(write_jsonl, tiny_tokenizer):
    rec = {"prompt": "The quick brown fox jumps over the lazy dog.", "completion": " Yes."}
    path = write_jsonl([{"prompt": "Hi", "completion": " there"}, rec])
    with pytest.raises(DataError) as e:
        prepare_dataset(path, "train", tiny_tokenizer, cfg(max_length=8))
    assert str(e.value).startswith(f"{path}:2: fully masked after truncation to 8 tokens")
    ds = prepare_dataset(path, "train", tiny_tokenizer, cfg(max_length=8, skip_invalid=True))
    assert len(ds) == 1 and ds.report.n_skipped_by_rule == {"fully_masked": 1}


def test_render_prompt_uses_the_generation_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = render_prompt(tok, "Hi")
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert render_prompt(plain, "Hi there") == tok("Hi there")["input_ids"]


def test_pad_id_comes_from_the_tokenizer(write_jsonl, tiny_tokenizer):
    ds = prepare_dataset(write_jsonl([{"text": "a b"}]), "train", tiny_tokenizer, cfg())
    assert (ds.pad_id, ds.eos_id) == (0, 2)


def test_a_token_straddling_the_prompt_end_is_trained(write_jsonl, tiny_tokenizer):
    """Pins the overlap rule: with a prompt ending in a space, BPE merges that space into the
    first completion token (" the"); training only tokens that START inside the span would drop
    the first word of every reply."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    rec = {"messages": [{"role": "user", "content": "a"},
                        {"role": "assistant", "content": "the sea"}]}
    ex = one(write_jsonl, tok, rec)
    assert " the" in [tok.decode([t]) for t in ex.input_ids]
    assert trained_text(tok, ex) == " the sea<|im_end|>"


def test_plain_text_end_of_turn_stays_trained(write_jsonl, tiny_tokenizer):
    """Whitespace is trimmed from a span only after a special token: a template whose turns end
    in a plain newline must keep it trained, or the model never learns to end its turn."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content + '\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    rec = {"messages": [{"role": "user", "content": "a"},
                        {"role": "assistant", "content": "the sea"}]}
    assert trained_text(tok, one(write_jsonl, tok, rec)) == " the sea\n"
