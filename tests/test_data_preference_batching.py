"""Preference batches: the 2B chosen/rejected layout, prompt_mask, KTO labels and KL rows."""

from __future__ import annotations

import types

import numpy as np
import pytest

from algorithms.data import Batch
from algorithms.data.preference import prepare_preference_dataset
from algorithms.data.preference_batching import (
    PreferenceBatchPlan,
    collate_paired,
    collate_unpaired,
)

ROWS = [{"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
        {"prompt": "Hello!", "chosen": " Hello, how are you today?", "rejected": " Go away."},
        {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " The sea."}]


def dataset(write_jsonl, tok, rows=ROWS, kind="paired", **kw):
    cfg = types.SimpleNamespace(**{"max_length": 64, **kw})
    return prepare_preference_dataset(write_jsonl(rows), "train", tok, cfg, kind=kind)


def masked_text(tok, arrays, key, row, prefix=""):
    """Decode the targets of ``row`` where ``arrays[prefix + key]`` is set."""
    mask = arrays[prefix + key][row] > 0
    return tok.decode(arrays[prefix + "targets"][row][mask].tolist())


def test_paired_layout_chosen_rows_then_rejected_rows(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    ds = dataset(write_jsonl, tok)
    arrays = collate_paired(ds, Batch(((2,), (0,), (1,))))
    width = max(max(len(p.chosen), len(p.rejected)) for p in ds.examples)
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        "input_ids": ((6, width), np.int32), "targets": ((6, width), np.int32),
        "loss_mask": ((6, width), np.float32), "segment_ids": ((6, width), np.int32),
        "prompt_mask": ((6, width), np.float32)}
    B = 3
    for i, k in enumerate((2, 0, 1)):
        row = ROWS[k]
        assert masked_text(tok, arrays, "loss_mask", i) == row["chosen"] + "<|im_end|>"
        assert masked_text(tok, arrays, "loss_mask", B + i) == row["rejected"] + "<|im_end|>"
        for r in (i, B + i):
            # prompt targets: every prompt token but the first, which no position predicts
            assert arrays["targets"][r][arrays["prompt_mask"][r] > 0].tolist() == \
                tok(row["prompt"])["input_ids"][1:]
    seq = ds.examples[0].rejected  # the shortest row: right-padded with pad id, segment 0
    n = len(seq)
    np.testing.assert_array_equal(arrays["input_ids"][B + 1, :n], seq.input_ids)
    np.testing.assert_array_equal(arrays["targets"][B + 1, :n - 1], seq.input_ids[1:])
    assert (arrays["input_ids"][B + 1, n:] == ds.pad_id).all()
    assert (arrays["targets"][B + 1, n - 1:] == ds.pad_id).all()
    assert arrays["segment_ids"][B + 1].tolist() == [1] * n + [0] * (width - n)
    assert arrays["loss_mask"][:, -1].sum() == 0
    # response and prompt targets never overlap
    assert (arrays["loss_mask"] * arrays["prompt_mask"]).sum() == 0


def test_chat_pairs_mask_the_end_of_turn(write_jsonl, tiny_tokenizer):
    tok = tiny_tokenizer
    user = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    arrays = collate_paired(dataset(write_jsonl, tok, rows), Batch(((0,),)))
    assert masked_text(tok, arrays, "loss_mask", 0) == "Hello!<|im_end|>"
    assert masked_text(tok, arrays, "loss_mask", 1) == "Go away.<|im_end|>"
    assert masked_text(tok, arrays, "prompt_mask", 1) == \
        "user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_plan_is_deterministic_covers_everything_and_refuses_packing(write_jsonl,
                                                                      tiny_tokenizer):
    ds = dataset(write_jsonl, tiny_tokenizer, ROWS * 4)
    plan = PreferenceBatchPlan(ds, batch_size=5, max_length=64, seed=3)
    epoch0 = plan.batches(0)
    assert epoch0 == PreferenceBatchPlan(ds, 5, 64, seed=3).batches(0)
    assert plan.num_batches == len(epoch0) == 3 and [len(b) for b in epoch0] == [5, 5, 2]
    assert sorted(i for b in epoch0 for i in b.indices) == list(range(12))
    assert plan.batches(1) != epoch0 and PreferenceBatchPlan(ds, 5, 64, seed=4).batches(0) != epoch0
    unshuffled = PreferenceBatchPlan(ds, 5, 64, shuffle=False).batches(0)
    assert unshuffled[0].indices == [0, 1, 2, 3, 4]
    assert plan.collate(epoch0[0])["input_ids"].shape[0] == 10
    with pytest.raises(ValueError, match="--packing"):
        PreferenceBatchPlan(ds, 2, 64, packing=True)
    with pytest.raises(ValueError, match="max_length 8"):
        PreferenceBatchPlan(ds, 2, 8)


def test_kto_labels_and_kl_rows_pair_prompt_i_with_completion_i_plus_1(write_jsonl,
                                                                        tiny_tokenizer):
    tok = tiny_tokenizer
    ds = dataset(write_jsonl, tok, kind="unpaired")  # 3 pairs -> 6 examples, chosen first
    order = (4, 0, 2)
    arrays = collate_unpaired(ds, Batch(tuple((i,) for i in order)))
    assert arrays["label"].dtype == np.float32 and arrays["label"].tolist() == [0.0, 1.0, 1.0]
    for key in ("input_ids", "targets", "loss_mask", "segment_ids", "prompt_mask"):
        assert arrays[key].shape[0] == 3 and arrays["kl_" + key].shape[0] == 3
    completions = [ROWS[1]["rejected"], ROWS[0]["chosen"], ROWS[2]["chosen"]]
    prompts = [ROWS[1]["prompt"], ROWS[0]["prompt"], ROWS[2]["prompt"]]
    for i in range(3):
        assert masked_text(tok, arrays, "loss_mask", i) == completions[i] + "<|im_end|>"
        j = (i + 1) % 3
        assert masked_text(tok, arrays, "loss_mask", i, "kl_") == completions[j] + "<|im_end|>"
        kl_ids = arrays["kl_input_ids"][i][arrays["kl_segment_ids"][i] > 0].tolist()
        assert tok.decode(kl_ids) == prompts[i] + completions[j] + "<|im_end|>"
        assert arrays["kl_targets"][i][arrays["kl_prompt_mask"][i] > 0].tolist() == \
            tok(prompts[i])["input_ids"][1:]
    no_kl = collate_unpaired(ds, Batch(((0,),)), kl=False)
    assert not any(k.startswith("kl_") for k in no_kl)
    with pytest.raises(ValueError, match=">= 2 examples"):
        collate_unpaired(ds, Batch(((0,),)))


def test_kl_rows_are_cut_to_max_length(write_jsonl, tiny_tokenizer):
    rows = [{"prompt": "Q:", "completion": " The quick brown fox jumps.", "label": True},
            {"prompt": "The weather is sunny and warm today.", "completion": " ok",
             "label": False}]
    ds = dataset(write_jsonl, tiny_tokenizer, rows, kind="unpaired")
    limit = max(len(e) for e in ds.examples)
    arrays = collate_unpaired(ds, Batch(((0,), (1,))), max_length=limit)
    natural = len(ds.examples[1].sequence.prompt_ids) + len(ds.examples[0].sequence.response_ids)
    assert natural > limit and arrays["kl_input_ids"].shape[1] == limit
    assert arrays["kl_input_ids"][1].tolist() == (ds.examples[1].sequence.prompt_ids
                                                  + ds.examples[0].sequence.response_ids)[:limit]


def test_kto_plan_needs_two_per_batch_and_folds_a_single_tail(write_jsonl, tiny_tokenizer):
    ds = dataset(write_jsonl, tiny_tokenizer, kind="unpaired")  # 6 examples
    with pytest.raises(ValueError, match="--batch-size=1"):
        PreferenceBatchPlan(ds, 1, 64)
    plan = PreferenceBatchPlan(ds, 5, 64, seed=1)
    batches = plan.batches(0)
    assert plan.num_batches == len(batches) == 1 and len(batches[0]) == 6
    arrays = plan.collate(batches[0])
    assert arrays["kl_input_ids"].shape[0] == 6 and arrays["label"].sum() == 3
    assert [len(b) for b in PreferenceBatchPlan(ds, 4, 64).batches(0)] == [4, 2]
    assert len(PreferenceBatchPlan(ds, 1, 64, kl=False).batches(0)) == 6
