"""ShareGPT, Alpaca and column-mapped rows: exactly the tokens and loss masks of the equivalent
messages / prompt-completion / preference / prompt rows, for every data family."""

from __future__ import annotations

import json

import pytest
from data_helpers import data_cfg

from algorithms.data import DataError
from algorithms.data.dataset import SFT
from algorithms.data.pipeline import prepare_splits
from algorithms.data.preference import PAIRED, UNPAIRED
from algorithms.rl.data import PROMPTS

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


def cfg(path, **kw):
    return data_cfg(path, **{"max_length": 128, **kw})


def content(dataset):
    """Every token id, mask and label of a dataset, whatever its family."""
    def seq(s):
        return (s.input_ids, s.loss_mask, s.prompt_length) if hasattr(s, "prompt_length") \
            else (s.input_ids, s.loss_mask)

    out = []
    for e in dataset.examples:
        if hasattr(e, "chosen"):
            out.append((seq(e.chosen), seq(e.rejected)))
        elif hasattr(e, "sequence"):
            out.append((seq(e.sequence), e.label))
        elif hasattr(e, "prompt_ids"):
            out.append((e.prompt_ids, e.columns))
        else:
            out.append(seq(e))
    return out


@pytest.fixture
def load(tmp_path, tiny_tokenizer):
    counter = iter(range(1000))

    def run(rows, family=SFT, suffix="jsonl", **kw):
        path = tmp_path / f"d{next(counter)}.{suffix}"
        if suffix == "parquet":
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return prepare_splits(cfg(path, **kw), tiny_tokenizer, family)["train"]

    return run


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_sharegpt_equals_messages(load):
    share = {"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello!"},
                               {"from": "user", "value": "2+2?"},
                               {"from": "assistant", "value": "4"}]}
    messages = {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"),
                             bot("Hello!"), user("2+2?"), bot("4")]}
    expected = content(load([messages]))
    assert content(load([share])) == expected
    assert content(load([share], suffix="parquet")) == expected
    assert content(load([share], data_format="sharegpt")) == expected
    role_style = {"conversations": [{"role": m["role"], "content": m["content"]}
                                    for m in messages["messages"]]}
    assert content(load([role_style])) == expected
    from_messages = {"messages": share["conversations"]}  # ShareGPT turns under "messages"
    assert content(load([from_messages])) == expected


def test_sharegpt_system_column_tools_and_function_calls(load):
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    share = {"system": "Use tools.", "tools": json.dumps([tool]), "conversations": [
        {"from": "human", "value": "add 1 and 2"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1}})},
        {"from": "observation", "value": "3"}, {"from": "gpt", "value": "It is 3."}]}
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    messages = {"tools": [tool], "messages": [
        {"role": "system", "content": "Use tools."}, user("add 1 and 2"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "3"}, bot("It is 3.")]}
    assert content(load([share])) == content(load([messages]))


def test_alpaca_equals_messages(load):
    alpaca = [{"instruction": "Add.", "input": "2 and 2", "output": "4", "system": "Be brief.",
               "history": [["Hi", "Hello"]]},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, user("Hi"),
                              bot("Hello"), user("Add.\n2 and 2"), bot("4")]},
                {"messages": [user("Say hi."), bot("hi")]}]
    expected = content(load(messages))
    assert content(load(alpaca)) == expected
    assert content(load(alpaca, suffix="parquet")) == expected


def test_column_mapping_equals_prompt_completion(load):
    mapped = [{"question": "Q1:", "answer": " yes", "id": 3}, {"question": "Q2:", "answer": " no",
                                                               "id": 4}]
    native = [{"prompt": "Q1:", "completion": " yes"}, {"prompt": "Q2:", "completion": " no"}]
    expected = content(load(native))
    assert content(load(mapped, columns=["prompt=question,completion=answer"])) == expected
    assert content(load(mapped, suffix="parquet",
                        columns=[{"prompt": "question", "completion": "answer"}])) == expected
    dialog = [{"dialog": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    assert content(load(dialog, columns=["conversations=dialog"])) == content(
        load([{"messages": [user("Hi"), bot("Yo")]}]))


def test_tables_select_the_format_columns_and_report_the_rest(load, tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Hi", "prompt_id": "x1", "messages": [user("Hi"), bot("Hello")]}]
    out = load(rows, suffix="parquet")
    assert content(out) == content(load([{"messages": rows[0]["messages"]}]))
    assert "columns not read: prompt, prompt_id" in str(out.split_report)
    with pytest.raises(DataError, match="ambiguous_format|exactly one of"):
        load(rows)  # a hand-written JSONL row keeps the strict rule


@pytest.mark.parametrize("rows, kw, match", [
    ([{"conversations": [{"from": "robot", "value": "x"}]}], {},
     r"\.jsonl:1: \"conversations\"\[0\] is from a string \"robot\"; expected one of human"),
    ([{"conversations": [{"from": "human", "value": "x"}], "lang": "en"}], {},
     r"unknown key 'lang' would be ignored; a ShareGPT row takes conversations"),
    ([{"instruction": "x", "input": ""}], {}, r"an Alpaca row needs \"output\""),
    ([{"instruction": "x", "output": "y", "history": [["only one"]]}], {},
     r"\"history\"\[0\] must be a \[query, reply\] pair"),
    ([{"q": "x", "a": "y"}], {"columns": ["prompt=question"]},
     r"no \"question\" column \(--columns prompt=question\); got keys \['q', 'a'\]"),
    ([{"prompt": "x", "completion": "y"}], {"data_format": "kto"},
     r"--data-format kto: supervised fine-tuning data takes auto, text"),
])
def test_row_errors_name_the_row_and_the_rule(load, rows, kw, match):
    with pytest.raises(DataError, match=match):
        load(rows, **kw)


def test_tables_missing_a_needed_column_name_the_columns_they_have(load):
    rows = [{"q": "x", "a": "y"}]
    with pytest.raises(DataError, match=r"\.parquet: --columns prompt=question: no column "
                                        r"'question'; the columns are: q, a"):
        load(rows, suffix="parquet", columns=["prompt=question", "completion=a"])
    with pytest.raises(DataError, match=r"alpaca data needs column 'instruction'; the columns "
                                        r"are: q, a"):
        load(rows, suffix="parquet", data_format="alpaca")
    with pytest.raises(DataError, match=r"needs columns \"text\", \"prompt\" and \"completion\", "
                                        r"or \"messages\".*the columns are: q, a"):
        load(rows, suffix="parquet")


def test_preference_layouts_equal_preference_rows(load):
    native = [{"prompt": [user("Q?")], "chosen": [bot("yes")], "rejected": [bot("no")]}]
    expected = content(load(native, PAIRED))
    share = [{"conversations": [{"from": "human", "value": "Q?"}],
              "chosen": {"from": "gpt", "value": "yes"},
              "rejected": {"from": "gpt", "value": "no"}}]
    alpaca = [{"instruction": "Q?", "chosen": "yes", "rejected": "no"}]
    assert content(load(share, PAIRED)) == expected
    assert content(load(alpaca, PAIRED)) == expected
    assert content(load(alpaca, PAIRED, suffix="parquet")) == expected


def test_kto_layouts_equal_kto_rows(load):
    native = [{"prompt": [user("Q?")], "completion": [bot("yes")], "label": True},
              {"prompt": [user("Q?")], "completion": [bot("no")], "label": False}]
    expected = content(load(native, UNPAIRED))
    share = [{"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": a}],
              "label": label} for a, label in (("yes", True), ("no", False))]
    alpaca = [{"instruction": "Q?", "output": a, "label": label}
              for a, label in (("yes", True), ("no", False))]
    assert content(load(share, UNPAIRED)) == expected
    assert content(load(alpaca, UNPAIRED)) == expected
    pairs = [{"instruction": "Q?", "chosen": "yes", "rejected": "no"}]  # unpaired: chosen first
    assert content(load(pairs, UNPAIRED)) == expected


def test_prompt_layouts_equal_prompt_rows_and_keep_reward_columns(load):
    native = [{"prompt": [user("2+2?")], "answer": "4"}]
    expected = content(load(native, PROMPTS))
    share = [{"conversations": [{"from": "human", "value": "2+2?"}], "answer": "4"}]
    assert content(load(share, PROMPTS)) == expected
    assert content(load([{"messages": [user("2+2?")], "answer": "4"}], PROMPTS,
                        data_format="messages")) == expected
    out = load([{"instruction": "2+2?", "input": "", "output": "4"}], PROMPTS)
    assert content(out) == [(expected[0][0], {"output": "4"})]
    assert content(load([{"question": "2+2?", "answer": "4"}], PROMPTS,
                        columns=["prompt=question"])) == [(load(
                            [{"prompt": "2+2?", "answer": "4"}], PROMPTS).examples[0].prompt_ids,
                            {"answer": "4"})]
