"""The tokenisation cache (a second run reads no row; any changed input is a miss) and
tokenisation across processes (the same examples, keys and errors as one process)."""

from __future__ import annotations

import copy
import json
import os

import pytest
from data_helpers import data_cfg

from algorithms.data import DataError, cache, parallel, pipeline
from algorithms.data.dataset import SFT
from algorithms.data.layouts import Layout
from algorithms.data.records import read_jsonl


def cfg(data, **kw):
    return data_cfg(data, **{"data_cache": True, **kw})


def rows(n, bad_at=()):
    out = []
    for i in range(n):
        row = {"messages": [{"role": "user", "content": f"say {i}"},
                            {"role": "assistant", "content": f"{i} {i}"}]}
        out.append({"messages": "oops"} if i in bad_at else row)
    return out


def write(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def content(out):
    return [(e.input_ids, e.loss_mask, e.source) for e in out["train"].examples]


@pytest.fixture
def counting(monkeypatch, tmp_path):
    """Counts how many splits were actually tokenised (cache misses); a private cache dir."""
    monkeypatch.setenv("POSTTRAIN_DATA_CACHE", str(tmp_path / "cache"))
    calls = []
    real = pipeline.process_records

    def spy(records, *args, **kwargs):
        calls.append(len(records))
        return real(records, *args, **kwargs)

    monkeypatch.setattr(pipeline, "process_records", spy)
    return calls


def test_second_run_reads_the_cache(tmp_path, tiny_tokenizer, counting):
    data = write(tmp_path / "d.jsonl", rows(20))
    first = pipeline.prepare_splits(cfg(data), tiny_tokenizer, SFT)
    second = pipeline.prepare_splits(cfg(data), tiny_tokenizer, SFT)
    assert counting == [20] and content(first) == content(second)
    assert str(first["train"].report) == str(second["train"].report)
    off = pipeline.prepare_splits(cfg(data, data_cache=False), tiny_tokenizer, SFT)
    assert counting == [20, 20] and content(off) == content(first)


def test_every_input_invalidates(tmp_path, tiny_tokenizer, counting, monkeypatch):
    data = write(tmp_path / "d.jsonl", rows(6))

    def miss(c, tokenizer=tiny_tokenizer):
        before = len(counting)
        pipeline.prepare_splits(c, tokenizer, SFT)
        pipeline.prepare_splits(c, tokenizer, SFT)  # and the change is cached in turn
        return len(counting) - before == 1

    assert miss(cfg(data))
    # same size, same mtime, one character changed: the content hash still sees it
    stat = data.stat()
    data.write_text(data.read_text().replace("say 3", "say 7"))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert miss(cfg(data))
    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = tiny_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert miss(cfg(data), templated)
    assert miss(cfg(data, max_length=32))
    assert miss(cfg(data, train_on="all"))
    assert miss(cfg(data, skip_invalid=True))
    assert miss(cfg(data, data_format="messages"))
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "other code")
    assert miss(cfg(data))


def test_unreadable_entries_are_ignored(tmp_path, tiny_tokenizer, counting):
    data = write(tmp_path / "d.jsonl", rows(4))
    first = pipeline.prepare_splits(cfg(data), tiny_tokenizer, SFT)
    for entry in (tmp_path / "cache").glob("tok-*.npz"):
        entry.write_bytes(b"garbage")
    again = pipeline.prepare_splits(cfg(data), tiny_tokenizer, SFT)
    assert counting == [4, 4] and content(again) == content(first)


def _process(records, tokenizer, workers, skip_invalid=False):
    processor = SFT.make_processor(tokenizer, cfg("x"), "d.jsonl")
    return parallel.process_records(records, Layout("sft"), processor, skip_invalid, workers)


def test_processes_give_what_one_process_gives(tmp_path, tiny_tokenizer, monkeypatch):
    records = read_jsonl(write(tmp_path / "d.jsonl", rows(300, bad_at=(170, 260))))
    pools = []
    real = parallel._in_pool
    monkeypatch.setattr(parallel, "_in_pool", lambda *a: pools.append(a[-1]) or real(*a))
    serial = _process(records, tiny_tokenizer, 1, skip_invalid=True)
    forked = _process(records, tiny_tokenizer, 2, skip_invalid=True)
    assert pools == [2]
    assert [(e.input_ids, e.loss_mask, e.source) for e in forked.examples] == \
        [(e.input_ids, e.loss_mask, e.source) for e in serial.examples]
    assert forked.keys == serial.keys and forked.skipped == serial.skipped == {"wrong_type": 2}
    assert forked.messages == serial.messages
    with pytest.raises(DataError, match=r"d\.jsonl:171: \"messages\" must be a list"):
        _process(records, tiny_tokenizer, 2)  # the earliest bad row, as in one process


def test_worker_count_pays_only_for_large_data_and_idle_cores(monkeypatch):
    assert parallel.worker_count(3, 10) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert parallel.worker_count(0, 100) == 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert parallel.worker_count(0, 10**7) == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))  # a busy machine
    assert parallel.worker_count(0, 10**7) == 1


def test_cache_round_trips_every_example_kind(tmp_path, monkeypatch):
    from algorithms.data.preference import PreferenceExample, PromptResponse, UnpairedExample
    from algorithms.data.tokenize import Example
    from algorithms.rl.data import PromptExample

    monkeypatch.setenv("POSTTRAIN_DATA_CACHE", str(tmp_path))
    side = PromptResponse([1, 2, 3], [0, 0, 1], 2, False, True)
    examples = [Example([5, 6], [0, 1], "a:1", True), PreferenceExample(side, side, "b[0]"),
                UnpairedExample(side, False, "c (rejected)"),
                PromptExample("d[2]", [{"role": "user", "content": "hi"}], [7, 8], {"answer": 4})]
    cache.save("k" * 64, {"examples": examples, "label": "x", "n_rows": 4})
    back = cache.load("k" * 64)
    assert back["examples"] == examples and back["label"] == "x"
    assert cache.load("j" * 64) is None
