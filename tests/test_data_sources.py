"""Data sources: JSON / parquet / arrow / CSV files, dirs, save_to_disk dirs and Hub ids, offline.

Every source of the same rows must give exactly the tokens and loss masks of the JSONL file;
malformed rows are reported with the source and the row number.
"""

from __future__ import annotations

import json
import shutil

import pytest
from data_helpers import data_cfg as cfg
from hub_helpers import add_to_hub_cache

from algorithms.data import DataError
from algorithms.data.dataset import SFT
from algorithms.data.pipeline import prepare_splits

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

CHAT = [{"messages": [{"role": "user", "content": f"say {w}"},
                      {"role": "assistant", "content": f"{w} {w}"}]}
        for w in ("red", "blue", "green", "cat", "dog")]
PC = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(5)]


def tokens(dataset):
    return [(e.input_ids, e.loss_mask) for e in dataset.examples]


def prepare(data, tokenizer, **kw):
    return prepare_splits(cfg(data if isinstance(data, list) else [str(data)], **kw), tokenizer,
                          SFT)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def reference(tmp_path, tiny_tokenizer):
    """Tokens of the rows read from plain JSONL: what every other source must reproduce."""
    def make(rows):
        return tokens(prepare(write_jsonl(tmp_path / "ref.jsonl", rows), tiny_tokenizer)["train"])
    return make


@pytest.mark.parametrize("rows", [CHAT, PC], ids=["messages", "prompt_completion"])
def test_every_file_type_gives_the_jsonl_tokens(rows, tmp_path, tiny_tokenizer, reference):
    expected = reference(rows)
    table = datasets.Dataset.from_list(rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "rows.arrow")
    paths = ["rows.json", "rows.parquet", "rows.arrow", "saved"]
    if rows is PC:  # CSV holds flat string columns only
        table.to_csv(str(tmp_path / "rows.csv"), index=False)
        paths.append("rows.csv")
    for name in paths:
        assert tokens(prepare(tmp_path / name, tiny_tokenizer)["train"]) == expected, name


def test_json_lines_in_a_json_file_keep_line_numbers(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(PC[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"rows\.json:2: has \"prompt\" but no \"completion\""):
        prepare(path, tiny_tokenizer)


def test_rows_are_reported_by_source_and_row(tmp_path, tiny_tokenizer):
    rows = PC[:2] + [{"prompt": "Q:", "completion": ""}] + PC[2:]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet\[2\]: \"completion\" is empty") as e:
        prepare(tmp_path / "d.parquet", tiny_tokenizer)
    assert e.value.rule == "empty_completion"
    (tmp_path / "a.json").write_text(json.dumps(PC[:1] + ["not an object"]))
    with pytest.raises(DataError, match=r"a\.json\[1\]: each element must be a JSON object"):
        prepare(tmp_path / "a.json", tiny_tokenizer)
    out = prepare(tmp_path / "d.parquet", tiny_tokenizer, skip_invalid=True)["train"]
    assert len(out) == 5 and out.report.n_skipped_by_rule == {"empty_completion": 1}
    datasets.Dataset.from_list([{"text": "a"}, {"text": None}]).to_parquet(str(tmp_path / "n.pq"))
    (tmp_path / "n.pq").rename(tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet\[1\]: 'text' is null in this row"):
        prepare(tmp_path / "n.parquet", tiny_tokenizer)


def test_nulls_arrow_adds_to_nested_objects_are_absent_keys(tmp_path, tiny_tokenizer, reference):
    """Regression: arrow stores the union of the keys of every row's nested objects, so one
    call's arguments {"a": 1} come back as {"a": 1, "b": null} when another row has "b"; the
    null must not reach the template (it would render "b": null)."""
    def call(args):
        return [{"type": "function", "function": {"name": "add", "arguments": args}}]

    rows = [{"messages": [{"role": "user", "content": "add"},
                          {"role": "assistant", "content": None, "tool_calls": call(args)},
                          {"role": "tool", "content": "1"},
                          {"role": "assistant", "content": "It is 1."}]}
            for args in ({"a": 1}, {"b": 2})]
    expected = reference(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    assert tokens(prepare(tmp_path / "t.parquet", tiny_tokenizer)["train"]) == expected


def test_directory_splits_by_file_name(tmp_path, tiny_tokenizer, reference):
    expected = reference(PC[:3])
    data = tmp_path / "hubstyle" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(PC[:3]).to_parquet(str(data / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(PC[3:]).to_parquet(str(data / "validation-00000-of-00001.parquet"))
    out = prepare(data.parent, tiny_tokenizer)
    assert tokens(out["train"]) == expected and len(out["valid"]) == 2
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "train.json").write_text(json.dumps(PC[:3]))
    write_jsonl(flat / "dev.jsonl", PC[3:])
    out = prepare(flat, tiny_tokenizer)
    assert tokens(out["train"]) == expected and len(out["valid"]) == 2


def test_directory_without_a_train_split_names_what_it_holds(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "valid.jsonl", PC)
    with pytest.raises(DataError, match=r"must contain train\.jsonl; it holds valid\.jsonl"):
        prepare(tmp_path, tiny_tokenizer)


def test_save_to_disk_dict_uses_split_names(tmp_path, tiny_tokenizer, reference):
    expected = reference(PC[:4])
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(PC[:4]),
                          "validation": datasets.Dataset.from_list(PC[4:])}
                         ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no split 'train' \(--data-split\); it has train_sft"):
        prepare(tmp_path / "dd", tiny_tokenizer)
    out = prepare(tmp_path / "dd", tiny_tokenizer, data_split="train_sft")
    assert tokens(out["train"]) == expected and len(out["valid"]) == 1
    assert out["train"].examples[0].source == f"{tmp_path / 'dd'}:train_sft[0]"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _parquet_bytes(tmp_path, rows, name):
    path = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path.read_bytes()


def test_hub_dataset_id_reads_the_local_cache_offline(hf_home, tmp_path, tiny_tokenizer,
                                                      reference):
    expected = reference(CHAT[:3])
    add_to_hub_cache(hf_home, "acme/chat", {
        "data/train-00000-of-00001.parquet": _parquet_bytes(tmp_path, CHAT[:3], "a"),
        "data/validation-00000-of-00001.parquet": _parquet_bytes(tmp_path, CHAT[3:], "b")},
        repo_type="dataset")
    out = prepare("acme/chat", tiny_tokenizer)
    assert tokens(out["train"]) == expected and len(out["valid"]) == 2
    assert out["train"].examples[0].source.endswith("[0]")


def test_hub_dataset_configs_from_the_readme(hf_home, tmp_path, tiny_tokenizer, reference):
    readme = ("---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n"
              "    path: small/train.parquet\n- config_name: big\n  data_files:\n"
              "  - split: train\n    path: big/*.parquet\n---\n# A dataset\n")
    add_to_hub_cache(hf_home, "acme/two", {
        "README.md": readme, "small/train.parquet": _parquet_bytes(tmp_path, PC[:2], "s"),
        "big/train.parquet": _parquet_bytes(tmp_path, PC, "b")}, repo_type="dataset")
    assert tokens(prepare("acme/two", tiny_tokenizer, data_config="small")["train"]) == \
        reference(PC[:2])
    assert len(prepare("acme/two", tiny_tokenizer, data_config="big")["train"]) == 5


def test_hub_dataset_absent_offline_names_the_id_and_the_cache(hf_home, tiny_tokenizer):
    with pytest.raises(DataError) as e:
        prepare("acme/absent", tiny_tokenizer)
    assert "'acme/absent'" in str(e.value) and str(hf_home / "hub") in str(e.value)
    assert "offline" in str(e.value)


def test_unknown_paths_and_file_types(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such file or directory.*Hugging Face dataset id"):
        prepare(tmp_path / "a" / "b" / "missing.jsonl", tiny_tokenizer)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        prepare(tmp_path / "notes.txt", tiny_tokenizer)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: could not be read"):
        prepare(tmp_path / "broken.parquet", tiny_tokenizer)
