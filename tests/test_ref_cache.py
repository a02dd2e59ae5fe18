"""--precompute-ref: cached reference log-probs equal a fresh computation, whatever batch an
example lands in, and a second run reuses the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlx")

from algorithms import ref_cache
from algorithms.config import TrainConfig
from algorithms.data.preference import dataset_fingerprint, prepare_preference_dataset
from algorithms.data.preference_batching import PreferenceBatchPlan
from algorithms.sft import nll_loss
from mlx_ft.backend import MLXBackend

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree"]


@pytest.fixture()
def pairs(tmp_path):
    rows = [{"prompt": f"say {w}", "chosen": f" {w} {w}", "rejected": f" no {i}"}
            for i, w in enumerate(WORDS)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cached_reference_matches_fresh(pairs, tiny_llama_dir, tiny_tokenizer, monkeypatch):
    cfg = TrainConfig(data=str(pairs), max_length=32, dtype="float32")
    dataset = prepare_preference_dataset(pairs, "train", tiny_tokenizer, cfg)
    plan = PreferenceBatchPlan(dataset, 3, 32, seed=0)
    backend = MLXBackend(cfg, tiny_llama_dir, tiny_tokenizer)
    # Move the policy away from the reference first: the cache must hold the reference.
    batch = plan.collate(plan.batches(0)[0])
    batch["num_items"] = np.float32(batch["loss_mask"].sum())
    backend.forward_backward(batch, nll_loss)
    backend.optimizer_step(5e-2, 1.0)

    path = ref_cache.cache_file(pairs, "train", ref_cache.model_fingerprint(tiny_llama_dir),
                                dataset_fingerprint(dataset))
    assert path.parent == pairs.parent / ".posttrain_cache"
    cache = ref_cache.load_or_precompute(backend, plan, True, path)
    assert path.is_file() and len(cache.entries) == 2 * len(WORDS)
    for b in plan.batches(1):  # other groupings than the ones it was computed with
        arrays = plan.collate(b)
        keys = ref_cache.ReferenceCache.row_keys(list(b.indices), paired=True)
        got = cache.rows(keys, arrays["input_ids"].shape[1])
        want = backend.reference_per_token_logps(arrays)
        real = arrays["segment_ids"] > 0
        np.testing.assert_allclose(got[real], want[real], atol=1e-6)
        assert np.abs(backend.per_token_logps(arrays)[real] - want[real]).max() > 1e-4

    def no_recompute(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(backend, "reference_per_token_logps", no_recompute)
    again = ref_cache.load_or_precompute(backend, plan, True, path)
    assert all(np.array_equal(again.entries[k], cache.entries[k]) for k in cache.entries)


def test_fingerprints_change_with_model_and_data(pairs, tiny_llama_dir, tiny_qwen2_dir,
                                                 tiny_tokenizer):
    fp_llama = ref_cache.model_fingerprint(tiny_llama_dir)
    assert fp_llama == ref_cache.model_fingerprint(tiny_llama_dir)
    assert fp_llama != ref_cache.model_fingerprint(tiny_qwen2_dir)
    short = prepare_preference_dataset(pairs, "train", tiny_tokenizer,
                                       TrainConfig(data="x", max_length=6, skip_invalid=True))
    full = prepare_preference_dataset(pairs, "train", tiny_tokenizer,
                                      TrainConfig(data="x", max_length=32))
    a = ref_cache.cache_file(pairs, "train", fp_llama, dataset_fingerprint(full))
    b = ref_cache.cache_file(pairs, "train", fp_llama, dataset_fingerprint(short))
    c = ref_cache.cache_file(pairs, "valid", fp_llama, dataset_fingerprint(full))
    assert len({a, b, c}) == 3
