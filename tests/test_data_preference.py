"""Preference data: formats, implicit prompts, response masks, truncation, rules, fingerprints."""

from __future__ import annotations

import types

import pytest

from algorithms.data import DataError
from algorithms.data.preference import (
    dataset_fingerprint,
    prepare_preference_dataset,
    sequence_hash,
)

USER = [{"role": "user", "content": "What is two plus two?"}]
FOUR = [{"role": "assistant", "content": "Four."}]
FIVE = [{"role": "assistant", "content": "Five."}]
CHAT_PROMPT = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"


def cfg(**kw):
    base = {"max_length": 256, "skip_invalid": False}
    base.update(kw)
    return types.SimpleNamespace(**base)


def prepare(write_jsonl, tok, rows, kind="paired", **kw):
    return prepare_preference_dataset(write_jsonl(rows), "train", tok, cfg(**kw), kind=kind)


def trained(tok, seq) -> str:
    return tok.decode([t for t, m in zip(seq.input_ids, seq.loss_mask) if m])


def prompt_text(tok, seq) -> str:
    return tok.decode(seq.prompt_ids)


def error(write_jsonl, tok, rows, kind="paired", **kw) -> DataError:
    with pytest.raises(DataError) as info:
        prepare(write_jsonl, tok, rows, kind, **kw)
    return info.value


def test_string_pairs_are_prompt_plus_response_plus_eos(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    ds = prepare(write_jsonl, tok, [{"prompt": "What is two plus two?", "chosen": " Four.",
                                     "rejected": " Five.", "id": 7, "meta": {"a": 1}}])
    (pair,) = ds.examples
    prompt = tok("What is two plus two?")["input_ids"]
    for seq, text in ((pair.chosen, " Four."), (pair.rejected, " Five.")):
        response = tok(text, add_special_tokens=False)["input_ids"]
        assert seq.input_ids == prompt + response + [tok.eos_token_id]
        assert seq.loss_mask == [0] * len(prompt) + [1] * (len(response) + 1)
        assert seq.prompt_length == len(prompt)
        assert trained(tok, seq) == text + "<|im_end|>"
    assert ds.report.format == "pref_string" and ds.report.n_examples == 1
    assert "1 pairs" in str(ds.report)


def test_chat_pairs_train_the_response_and_end_of_turn_only(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    ds = prepare(write_jsonl, tok, [{"prompt": USER, "chosen": FOUR, "rejected": FIVE}])
    (pair,) = ds.examples
    assert trained(tok, pair.chosen) == "Four.<|im_end|>"
    assert trained(tok, pair.rejected) == "Five.<|im_end|>"
    assert prompt_text(tok, pair.chosen) == prompt_text(tok, pair.rejected) == CHAT_PROMPT
    # the newline the template writes after <|im_end|> is a response token but carries no loss
    assert tok.decode(pair.chosen.response_ids) == "Four.<|im_end|>\n"
    assert pair.chosen.loss_mask[-1] == 0


def test_implicit_chat_prompt_is_the_common_leading_messages(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    history = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}] + USER
    ds = prepare(write_jsonl, tok, [{"chosen": history + FOUR, "rejected": history + FIVE}])
    (pair,) = ds.examples
    assert ds.report.format == "pref_implicit_chat"
    # the earlier assistant turn is prompt, not trained
    assert trained(tok, pair.chosen) == "Four.<|im_end|>"
    assert trained(tok, pair.rejected) == "Five.<|im_end|>"
    assert prompt_text(tok, pair.chosen).endswith(CHAT_PROMPT)
    assert "Hello!" in prompt_text(tok, pair.chosen)


def test_implicit_string_prompt_ends_at_the_last_common_whitespace(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    ds = prepare(write_jsonl, tok, [{"chosen": "The answer is four", "rejected":
                                     "The answer is five"}])
    (pair,) = ds.examples
    assert pair.chosen.prompt_ids == tok("The answer is")["input_ids"]
    assert trained(tok, pair.chosen) == " four<|im_end|>"
    assert trained(tok, pair.rejected) == " five<|im_end|>"


def test_implicit_string_when_one_side_extends_the_other(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    ds = prepare(write_jsonl, tok, [{"chosen": "Paris is the capital", "rejected":
                                     "Paris is the capital of France"}])
    (pair,) = ds.examples
    assert prompt_text(tok, pair.chosen) == "Paris is the"
    assert trained(tok, pair.chosen) == " capital<|im_end|>"
    assert trained(tok, pair.rejected) == " capital of France<|im_end|>"


def test_kto_rows_and_labels(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": USER, "completion": FOUR, "label": True},
            {"prompt": USER, "completion": FIVE, "label": False}]
    ds = prepare(write_jsonl, tok, rows, kind="unpaired")
    assert [e.label for e in ds.examples] == [True, False]
    assert [trained(tok, e.sequence) for e in ds.examples] == ["Four.<|im_end|>",
                                                               "Five.<|im_end|>"]
    assert (ds.report.n_desirable, ds.report.n_undesirable) == (1, 1)
    strings = prepare(write_jsonl, tok, [{"prompt": "Q:", "completion": " 4", "label": True},
                                         {"prompt": "Q:", "completion": " 5", "label": False}],
                      kind="unpaired")
    assert trained(tok, strings.examples[0].sequence) == " 4<|im_end|>"


def test_kto_with_one_label_only_is_an_error(write_jsonl, tiny_tokenizer):
    """Regression: KTO trained silently on data whose labels were all true."""
    for label, have in ((True, "desirable"), (False, "undesirable")):
        rows = [{"prompt": "Q:", "completion": f" {i}", "label": label} for i in range(3)]
        with pytest.raises(DataError, match=f"every KTO example is {have}"):
            prepare(write_jsonl, tiny_tokenizer, rows, kind="unpaired")


def test_paired_data_is_unpaired_automatically(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "A:", "chosen": " yes", "rejected": " no"},
            {"prompt": "B:", "chosen": " one", "rejected": " two"}]
    ds = prepare(write_jsonl, tok, rows, kind="unpaired")
    # all chosen (file order) first, then all rejected
    assert [(trained(tok, e.sequence), e.label) for e in ds.examples] == [
        (" yes<|im_end|>", True), (" one<|im_end|>", True),
        (" no<|im_end|>", False), (" two<|im_end|>", False)]
    assert ds.examples[0].source.endswith("train.jsonl:1 (chosen)")
    assert ds.examples[3].source.endswith("train.jsonl:2 (rejected)")
    assert (ds.report.n_examples, ds.report.n_desirable, ds.report.n_undesirable) == (4, 2, 2)


def test_truncation_keeps_start_and_counts(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "Q:", "chosen": " The quick brown fox jumps over the lazy dog.",
             "rejected": " no"}, {"prompt": "Q:", "chosen": " yes", "rejected": " no"}]
    full = prepare(write_jsonl, tok, rows)
    n = len(full.examples[0].chosen)
    ds = prepare(write_jsonl, tok, rows, max_length=n - 3)
    pair = ds.examples[0]
    assert pair.chosen.input_ids == full.examples[0].chosen.input_ids[: n - 3]
    assert pair.chosen.truncated and not pair.rejected.truncated
    assert pair.rejected.input_ids == full.examples[0].rejected.input_ids
    assert ds.report.n_truncated == 1


def test_max_prompt_length_keeps_the_end_of_the_prompt(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": USER, "chosen": FOUR, "rejected": FIVE}]
    full = prepare(write_jsonl, tok, rows).examples[0].chosen
    ds = prepare(write_jsonl, tok, rows, max_prompt_length=4)
    seq = ds.examples[0].chosen
    assert seq.prompt_ids == full.prompt_ids[-4:] and seq.response_ids == full.response_ids
    assert trained(tok, seq) == "Four.<|im_end|>"
    assert ds.report.n_prompt_truncated == 1 and "prompts cut" in str(ds.report)
    with pytest.raises(DataError, match="--max-prompt-length=300"):
        prepare(write_jsonl, tok, rows, max_prompt_length=300)


def test_fully_masked_after_truncation_names_file_line_and_side(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
            {"prompt": USER, "chosen": FOUR, "rejected": FIVE}]
    e = error(write_jsonl, tok, [rows[0], rows[0]], max_length=len(tok("Q:")["input_ids"]))
    assert e.rule == "fully_masked" and 'train.jsonl:1: the "chosen" response' in str(e)
    e = error(write_jsonl, tok, [rows[1]], max_length=10)
    assert e.rule == "fully_masked"
    assert 'train.jsonl:1: the "chosen" response is fully masked after truncation to 10' in str(e)
    # a prompt longer than max_length is skipped and counted under --skip-invalid
    long = {"prompt": "The quick brown fox jumps over the lazy dog.", "chosen": " yes",
            "rejected": " no"}
    ds = prepare(write_jsonl, tok, [rows[0], long], max_length=6, skip_invalid=True)
    assert len(ds) == 1 and ds.report.n_skipped_by_rule == {"fully_masked": 1}


MALFORMED = [
    ({"prompt": "Q", "chosen": " a", "rejected": " a"}, "chosen_equals_rejected",
     '"chosen" and "rejected" are identical'),
    ({"prompt": "Q", "chosen": " a"}, "missing_key", 'has "chosen" but no "rejected"'),
    ({"prompt": "Q", "rejected": " a"}, "missing_key", 'has "rejected" but no "chosen"'),
    ({"prompt": "Q", "chosen": "  ", "rejected": " b"}, "empty_completion", '"chosen" is empty'),
    ({"prompt": USER, "chosen": [], "rejected": FIVE}, "empty_completion",
     '"chosen" is an empty message list'),
    ({"prompt": [], "chosen": FOUR, "rejected": FIVE}, "empty_prompt", '"prompt" is an empty'),
    ({"prompt": "Q", "chosen": 3, "rejected": " b"}, "wrong_type",
     "must all be strings or all be message lists; got \"prompt\" a string, \"chosen\" a number"),
    ({"prompt": "Q", "chosen": " a", "rejected": " b", "score": 1}, "unknown_key",
     "unknown key 'score'"),
    ({"prompt": "Q", "chosen": " a", "rejected": " b", "completion": " c"}, "ambiguous_format",
     "either paired"),
    ({"question": "Q", "answer": "a"}, "unknown_format", 'needs "chosen" and "rejected"'),
    ({"chosen": "yes", "rejected": "no"}, "no_common_prefix", "share no prompt"),
    ({"chosen": FOUR, "rejected": FIVE}, "no_common_prefix", "their first messages differ"),
    ({"chosen": USER + FOUR, "rejected": USER}, "empty_completion",
     '"rejected" is the common prefix itself'),
    ({"chosen": USER + FOUR, "rejected": [{"role": "user", "content": "Hm?"}]}, "no_common_prefix",
     "share no prompt"),
    ({"chosen": [{"role": "system", "content": "x"}] + USER + FOUR,
      "rejected": [{"role": "system", "content": "x"}, {"role": "user", "content": "Hm?"}] + FOUR},
     "response_not_assistant", 'the "chosen" response after the common prefix must start'),
    ({"prompt": USER, "chosen": USER + FOUR, "rejected": FIVE}, "response_not_assistant",
     'the "chosen" response must start with an assistant turn; got role a string "user"'),
    ({"prompt": USER, "chosen": [{"role": "bot", "content": "x"}], "rejected": FIVE},
     "unknown_role", '"chosen"[0] has role'),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": 1}], "rejected": FIVE},
     "content_not_string", '"chosen"[0] "content" must be a string'),
    ({"prompt": "Q", "completion": " a", "label": True}, "unpaired_data",
     "this is unpaired (KTO) data"),
]


@pytest.mark.parametrize(("row", "rule", "message"), MALFORMED,
                         ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(MALFORMED)])
def test_malformed_rows_name_file_line_and_rule(write_jsonl, tiny_tokenizer, row, rule, message):
    good = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    if isinstance(row.get("chosen", row.get("completion")), list) or "prompt" not in row:
        good = row  # a different format on line 1 would be reported as mixed_formats
        rows = [row]
        line = 1
    else:
        rows = [good, row]
        line = 2
    e = error(write_jsonl, tiny_tokenizer, rows)
    assert e.rule == rule
    assert f"train.jsonl:{line}: " in str(e) and message in str(e), str(e)
    assert e.source.endswith(f"train.jsonl:{line}")


KTO_MALFORMED = [
    ({"prompt": "Q", "completion": " a", "label": "yes"}, "wrong_type",
     '"label" must be true (desirable) or false (undesirable); got a string "yes"'),
    ({"prompt": "Q", "completion": " a"}, "missing_key", '"label" is missing'),
    ({"prompt": "Q", "label": True}, "missing_key", '"completion" is missing'),
    ({"prompt": "Q", "completion": " ", "label": False}, "empty_completion",
     '"completion" is empty'),
    ({"prompt": "Q", "completion": " a", "label": True, "chosen": " b"}, "ambiguous_format",
     "either paired"),
]


@pytest.mark.parametrize(("row", "rule", "message"), KTO_MALFORMED,
                         ids=[r for _, r, _ in KTO_MALFORMED])
def test_malformed_kto_rows(write_jsonl, tiny_tokenizer, row, rule, message):
    e = error(write_jsonl, tiny_tokenizer, [row], kind="unpaired")
    assert e.rule == rule and "train.jsonl:1: " in str(e) and message in str(e), str(e)


def test_mixed_formats_names_both_lines(write_jsonl, tiny_tokenizer):
    rows = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
            {"chosen": "Q: yes", "rejected": "Q: no"}]
    e = error(write_jsonl, tiny_tokenizer, rows)
    assert e.rule == "mixed_formats"
    assert "train.jsonl:2: this example is \"chosen\"/\"rejected\" strings (implicit prompt) " \
        "but the file's first example (" in str(e) and "train.jsonl:1)" in str(e)


def test_skip_invalid_counts_rules_and_keeps_the_rest(write_jsonl, tiny_tokenizer):
    rows = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
            {"prompt": "Q:", "chosen": " a", "rejected": " a"},
            "not json",
            {"prompt": "Q:", "chosen": " a"},
            {"prompt": "Q:", "chosen": " b", "rejected": " a"},
            {"prompt": "Q:", "chosen": " c", "rejected": " c"}]
    ds = prepare(write_jsonl, tiny_tokenizer, rows, skip_invalid=True)
    assert len(ds) == 2
    assert ds.report.n_skipped_by_rule == {"chosen_equals_rejected": 2, "invalid_json": 1,
                                           "missing_key": 1}
    assert "train.jsonl:2: " in ds.report.skipped[0]
    assert "skipped 4 invalid examples" in str(ds.report)
    with pytest.raises(DataError, match="no usable examples; all 1 were invalid"):
        prepare(write_jsonl, tiny_tokenizer, rows[1:2], skip_invalid=True)


def test_packing_is_refused(write_jsonl, tiny_tokenizer):
    with pytest.raises(DataError, match="--packing"):
        prepare(write_jsonl, tiny_tokenizer, [{"prompt": "Q", "chosen": " a",
                                               "rejected": " b"}], packing=True)


def test_fingerprint_is_stable_and_sensitive(write_jsonl, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    rows = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
            {"prompt": "A:", "chosen": " one", "rejected": " two"}]
    base = dataset_fingerprint(prepare(write_jsonl, tok, rows))
    assert len(base) == 64
    assert dataset_fingerprint(prepare(write_jsonl, tok, rows)) == base
    # the same content under another file name: same fingerprint (sources are not hashed)
    moved = prepare_preference_dataset(write_jsonl(rows, "moved.jsonl"), "train", tok, cfg())
    assert dataset_fingerprint(moved) == base
    changed = [dict(rows[0], rejected=" nope"), rows[1]]
    others = [
        dataset_fingerprint(prepare(write_jsonl, tok, changed)),
        dataset_fingerprint(prepare(write_jsonl, tok, rows[::-1])),
        dataset_fingerprint(prepare(write_jsonl, tok, rows, max_length=200)),
        dataset_fingerprint(prepare(write_jsonl, tok, rows, kind="unpaired")),
        dataset_fingerprint(prepare(write_jsonl, tok, rows, max_prompt_length=8)),
    ]
    assert len({base, *others}) == 6
    seq = prepare(write_jsonl, tok, rows).examples[0].chosen
    h = sequence_hash(seq.input_ids, seq.loss_mask, seq.prompt_length)
    assert h == sequence_hash(list(seq.input_ids), list(seq.loss_mask), seq.prompt_length)
    assert h != sequence_hash(seq.input_ids, seq.loss_mask, seq.prompt_length - 1)
    assert h != sequence_hash(seq.input_ids, [0] + seq.loss_mask[1:-1] + [0],
                              seq.prompt_length)
