"""--data with weights, the YAML list form, and the --valid-fraction hold-out: proportions, a pure
function of the seed, a validation set stable across runs, reported per source."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from data_helpers import data_cfg as cfg

from algorithms.config import ConfigError, build_config
from algorithms.data import DataError
from algorithms.data.dataset import SFT
from algorithms.data.mixing import draw, hold_out, holdout_counts, largest_remainder
from algorithms.data.pipeline import prepare_splits
from algorithms.data.sources import parse_columns, parse_sources
from algorithms.sft import SFTConfig


def write(path, n, tag):
    path.write_text("".join(json.dumps({"prompt": f"{tag} {i}:", "completion": f" {i}"}) + "\n"
                            for i in range(n)))
    return str(path)


def origin(example):
    return example.source.rsplit(":", 1)[0]


def test_largest_remainder_adds_up_and_follows_the_shares():
    assert largest_remainder([0.7, 0.3], 10) == [7, 3]
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    counts = largest_remainder([0.5, 0.25, 0.25], 7)
    assert sum(counts) == 7 and counts[0] >= counts[1]


def test_draw_proportions_repeats_and_seed():
    picks = draw([100, 20], [0.5, 0.5], seed=3)
    assert [len(p) for p in picks] == [60, 60]
    assert len(set(picks[0].tolist())) == 60  # 60 distinct of 100: no repeats needed
    assert Counter(picks[1].tolist()) == {i: 3 for i in range(20)}  # 3 full passes of 20
    again = draw([100, 20], [0.5, 0.5], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(picks, again))
    other = draw([100, 20], [0.5, 0.5], seed=4)
    assert not np.array_equal(picks[0], other[0])
    assert [p.tolist() for p in draw([3, 2], [None, None], 0)] == [[0, 1, 2], [0, 1]]


def test_weighted_mix_end_to_end_is_reported_per_source(tmp_path, tiny_tokenizer):
    a, b = write(tmp_path / "a.jsonl", 40, "A"), write(tmp_path / "b.jsonl", 10, "B")
    out = prepare_splits(cfg([f"{a}:0.7", f"{b}:0.3"], seed=1), tiny_tokenizer, SFT)
    counts = Counter(origin(e) for e in out["train"].examples)
    assert counts == {a: 35, b: 15}  # 0.7 and 0.3 of the 50 examples
    same = prepare_splits(cfg([f"{a}:0.7", f"{b}:0.3"], seed=1), tiny_tokenizer, SFT)
    assert [e.source for e in same["train"].examples] == [e.source for e in
                                                          out["train"].examples]
    report = str(out["train"].split_report)
    assert "weight 0.7 -> 35 examples (0.88x)" in report and "weight 0.3 -> 15 examples (1.50x)" \
        in report
    plain = prepare_splits(cfg([a, b]), tiny_tokenizer, SFT)["train"]
    assert Counter(origin(e) for e in plain.examples) == {a: 40, b: 10}


def test_holdout_is_a_function_of_row_content_only(tmp_path, tiny_tokenizer):
    a = write(tmp_path / "a.jsonl", 50, "A")
    runs = [prepare_splits(cfg([a], valid_fraction=0.2, seed=s), tiny_tokenizer, SFT)
            for s in (0, 1)]
    valid = [sorted(e.input_ids for e in r["valid"].examples) for r in runs]
    assert len(valid[0]) == 10 and valid[0] == valid[1]  # the seed does not move it
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "shuffled.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    shuffled = prepare_splits(cfg([str(tmp_path / "shuffled.jsonl")], valid_fraction=0.2),
                              tiny_tokenizer, SFT)
    assert sorted(e.input_ids for e in shuffled["valid"].examples) == valid[0]
    train = {tuple(e.input_ids) for e in runs[0]["train"].examples}
    assert not train & {tuple(v) for v in valid[0]} and len(train) == 40
    counted = prepare_splits(cfg([a], valid_fraction=7), tiny_tokenizer, SFT)
    assert len(counted["valid"]) == 7 and "7 held out for validation" in str(
        counted["train"].split_report)


def test_holdout_never_splits_identical_rows_and_keeps_a_training_example():
    keys = ["b", "a", "a", "c", "a"]
    train, valid = hold_out(keys, 2)  # the cut would fall inside the run of "a"
    assert valid == [] and train == [0, 1, 2, 3, 4]
    train, valid = hold_out(keys, 3)
    assert sorted(keys[i] for i in valid) == ["a", "a", "a"] and train == [0, 3]
    assert holdout_counts([10, 30], 8) == [2, 6]
    assert holdout_counts([1, 4], 0.5) == [0, 2]


def test_a_source_with_its_own_valid_split_is_not_held_out(tmp_path, tiny_tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    write(d / "train.jsonl", 20, "T")
    write(d / "valid.jsonl", 3, "V")
    out = prepare_splits(cfg([str(d)], valid_fraction=0.5), tiny_tokenizer, SFT)
    assert (len(out["train"]), len(out["valid"])) == (20, 3)


def test_parse_sources_forms_and_errors(tmp_path):
    specs = parse_sources(["a.parquet:0.7", "b.jsonl:3", {"path": "org/set", "weight": 1,
                                                          "split": "train_sft",
                                                          "columns": {"prompt": "q"}}])
    assert [(s.path, s.weight) for s in specs] == [("a.parquet", 0.7), ("b.jsonl", 3.0),
                                                   ("org/set", 1.0)]
    assert specs[2].split == "train_sft" and specs[2].columns == (("prompt", "q"),)
    odd = tmp_path / "run:1"
    odd.mkdir()
    assert parse_sources([str(odd)])[0].path == str(odd)  # an existing path keeps its colon
    for data, match in ((["a:0.5", "b"], "give every source a weight"),
                        (["a:0"], "weight must be a finite number > 0"),
                        ([{"path": "a", "wieght": 1}], "unknown key 'wieght'.*'weight'"),
                        ([{"weight": 1}], 'needs a "path"'),
                        ([], "--data is required")):
        with pytest.raises(DataError, match=match):
            parse_sources(data)
    assert parse_columns(["prompt=q, completion=a"]) == (("prompt", "q"), ("completion", "a"))
    with pytest.raises(DataError, match="is not target=source"):
        parse_columns(["prompt"])


def test_yaml_list_form_and_flags(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data:\n  - path: a.parquet\n    weight: 0.7\n    format: sharegpt\n"
                 "  - b.jsonl:0.3\ncolumns:\n  prompt: question\nvalid_fraction: 0.1\n")
    c = build_config(SFTConfig, ["--config", str(y)], "p")
    assert c.data == [{"path": "a.parquet", "weight": 0.7, "format": "sharegpt"}, "b.jsonl:0.3"]
    assert c.columns == [{"prompt": "question"}] and c.valid_fraction == 0.1
    c = build_config(SFTConfig, ["--data", "a.jsonl:0.7", "b.jsonl:0.3", "--columns",
                                 "prompt=q", "completion=a"], "p")
    assert c.data == ["a.jsonl:0.7", "b.jsonl:0.3"] and c.columns == ["prompt=q", "completion=a"]
    for argv, match in ((["--data", "a:0.5", "b"], "give every source a weight"),
                        (["--data", "a", "--valid-fraction", "2.5"], "--valid-fraction=2.5"),
                        (["--data", "a", "--chat-template", "nope"], "neither a file")):
        with pytest.raises(ConfigError, match=match):
            build_config(SFTConfig, argv, "p")
