"""--chat-template: built-in templates render what their model families expect, are
prefix-stable (assistant-only masks work), override the tokenizer's own, and files are checked."""

from __future__ import annotations

import copy

import pytest

from algorithms.data import DataError, Record, tokenize_record
from algorithms.data.templates import (
    BUILTIN_TEMPLATES,
    CHAT_TEMPLATE_FILE,
    apply_chat_template,
    resolve_chat_template,
    save_chat_template,
)

CONVERSATION = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
EXPECTED = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
              "<|im_start|>assistant\nA<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>",
    "gemma": "<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n",
}
GENERATION = {"chatml": "<|im_start|>assistant\n",
              "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "gemma": "<start_of_turn>model\n"}


@pytest.fixture
def with_template(tiny_tokenizer):
    def make(name):
        tokenizer = copy.deepcopy(tiny_tokenizer)
        apply_chat_template(tokenizer, name)
        return tokenizer
    return make


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_renderings(name, with_template):
    tokenizer = with_template(name)
    render = tokenizer.apply_chat_template
    assert render(CONVERSATION, tokenize=False) == EXPECTED[name]
    assert render(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == \
        EXPECTED[name][:EXPECTED[name].index("A")]
    assert render(CONVERSATION[:2], tokenize=False, add_generation_prompt=True).endswith(
        GENERATION[name])


def test_chatml_tool_calls_and_tools(with_template):
    tokenizer = with_template("chatml")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "add"}, {"role": "assistant", "content": None,
                                              "tool_calls": [CALL]}],
        tools=[{"type": "function", "function": {"name": "add"}}], tokenize=False)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>' in text
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "add"' in text


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtins_are_prefix_stable_and_mask_only_the_replies(name, with_template):
    tokenizer = with_template(name)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "four"},
                {"role": "user", "content": "and again?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "4"},
                {"role": "assistant", "content": "The answer is 4."}]
    example = tokenize_record(Record("t.jsonl", 1, {"messages": messages}), "messages",
                              tokenizer, "auto", 4096)
    trained = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    assert "four" in trained and "The answer is 4." in trained and '"add"' in trained
    assert not any(text in trained for text in ("two plus two", "and again", "Be brief"))


def test_override_changes_the_tokens_and_warns_about_split_markers(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    default = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert apply_chat_template(tokenizer, "chatml") == []  # the tiny tokenizer's own specials
    warnings = apply_chat_template(tokenizer, "llama3")
    assert len(warnings) == 1 and "<|eot_id|>" in warnings[0] and "plain text" in warnings[0]
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) != default
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["llama3"]


def test_template_files_are_read_and_checked(tmp_path, tiny_tokenizer):
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert resolve_chat_template(str(good)) == good.read_text()
    tokenizer = copy.deepcopy(tiny_tokenizer)
    apply_chat_template(tokenizer, str(good))
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert rendered == "[user] U\n[assistant] A\n"
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}\n{{ m.content }\n")
    with pytest.raises(DataError, match=r"bad\.jinja:3: not a valid Jinja template"):
        resolve_chat_template(str(bad))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(DataError, match="the file is empty"):
        resolve_chat_template(str(tmp_path / "empty.jinja"))
    with pytest.raises(DataError, match=r"neither a file nor a built-in template \(chatml"):
        resolve_chat_template("vicuna")


def test_save_writes_the_template_in_use(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    apply_chat_template(tokenizer, "gemma")
    save_chat_template(tmp_path, tokenizer)
    assert (tmp_path / CHAT_TEMPLATE_FILE).read_text() == BUILTIN_TEMPLATES["gemma"]
    empty = tmp_path / "none"
    empty.mkdir()
    tokenizer.chat_template = None
    save_chat_template(empty, tokenizer)
    assert not (empty / CHAT_TEMPLATE_FILE).exists()
