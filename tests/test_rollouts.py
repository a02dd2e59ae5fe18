"""Rollout sampling: ``finish`` rules, and ``Backend.sample`` on MLX and torch.

Greedy (``top_k=1``) sampling is checked token for token against a decoding from full logits
(no cache, no padding), on both backends, whatever the batching; stochastic sampling is checked
for seeding and, empirically, for the filters (every sampled token lies in the set the filters
allow, computed here from the model's full logits).
"""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.rl.sampling import (
    Completion,
    SamplingParams,
    StopStringWatch,
    end_of_turn_id,
    finish,
    stop_token_ids,
)

MESSAGES = ("say red", "what is the capital of France? tell me now, please", "hi")


# --- finish and params (no model) -----------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    ({"max_tokens": 0}, "max_tokens=0"), ({"temperature": 0.0}, "temperature=0.0"),
    ({"top_p": 0.0}, "top_p=0.0"), ({"top_k": -1}, "top_k=-1"), ({"min_p": 1.5}, "min_p=1.5"),
    ({"batch_size": -2}, "batch_size=-2"), ({"stop": ("",)}, "stop=('',)"),
])
def test_params_refuse_bad_values(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**{"max_tokens": 4, **kwargs})


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_finish_cuts_at_first_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    body = _ids(tok, "Paris is the capital")
    got = finish(body + [eos] + _ids(tok, " of France") + [eos, 0, 0], tok,
                 SamplingParams(max_tokens=50), [eos])
    assert got == Completion(body + [eos], "Paris is the capital", "eos") and not got.truncated


def test_finish_length_and_max_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = _ids(tok, "Paris is the capital of France.")
    got = finish(ids, tok, SamplingParams(max_tokens=4), [tok.eos_token_id])
    assert got.ids == ids[:4] and got.finish_reason == "length" and got.truncated
    assert got.text == tok.decode(ids[:4])


@pytest.mark.parametrize("stops, n_tokens, text", [
    (("capit",), 6, "Paris is the capit"),          # ends inside the token "apital"
    (("ris is t",), 4, "Paris is t"),                # spans 4 tokens, ends inside " the"
    (("France", "is the"), 4, "Paris is the"),       # the stop that completes first wins
])
def test_finish_cuts_at_stop_string(tiny_tokenizer, stops, n_tokens, text):
    tok = tiny_tokenizer
    ids = _ids(tok, "Paris is the capital of France.")  # Par|is| is| the| c|apital| of| France|.
    eos = tok.eos_token_id
    got = finish(ids + [eos], tok, SamplingParams(max_tokens=50, stop=stops), [eos])
    assert got == Completion(ids[:n_tokens], text, "stop")
    # the shortest prefix: one token fewer no longer contains any stop string
    assert not any(s in tok.decode(ids[:n_tokens - 1]) for s in stops)


def test_finish_eos_before_stop_string_wins(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    head = _ids(tok, "Paris is")
    got = finish(head + [eos] + _ids(tok, " the capital"), tok,
                 SamplingParams(max_tokens=50, stop=("capital",)), [eos])
    assert got == Completion(head + [eos], "Paris is", "eos")


def test_stop_ids_and_watch(tiny_tokenizer, tiny_llama_dir):
    tok = tiny_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    assert stop_token_ids(tok, tiny_llama_dir) == (im_end,)
    watch = StopStringWatch(tok, ("capit",))
    ids = _ids(tok, "Paris is the capital of France.")
    assert watch.seen(ids[:6]) and not watch.seen(ids[:5])
    assert not StopStringWatch(tok, ()) and not StopStringWatch(tok, ()).seen(ids)


# --- backends --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backends(tiny_llama_dir, tiny_tokenizer):
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    import torch

    from algorithms.config import TrainConfig
    from cuda_ft.backend import TorchBackend
    from mlx_ft.backend import MLXBackend

    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box OpenMP's spinning
    # threads made these tests ~10x slower: one thread here, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrainConfig(data="unused", dtype="float32", logprob_chunk_size=16)
    yield {"mlx": MLXBackend(cfg, tiny_llama_dir, tiny_tokenizer),
           "torch": TorchBackend(cfg, tiny_llama_dir, tiny_tokenizer)}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    from algorithms.data import render_prompt

    out = [render_prompt(tiny_tokenizer, m) for m in MESSAGES]
    assert len({len(p) for p in out}) == 3, "prompts of different lengths test the left padding"
    return out


def _full_logits(backends, ids: list[int]) -> np.ndarray:
    """Float64 next-token logits after ``ids``: one full forward (no cache, no padding) of the
    adapted MLX model, an oracle independent of both sampling paths."""
    import mlx.core as mx

    logits = backends["mlx"].model(mx.array([ids]))[0, -1]
    return np.array(logits.astype(mx.float32)).astype(np.float64)


def _greedy_reference(backends, prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    for _ in range(max_tokens):
        out.append(int(np.argmax(_full_logits(backends, prompt + out))))
    return out


@pytest.fixture(scope="module")
def greedy_ids(backends, prompts) -> list[list[int]]:
    """20 greedy tokens per prompt from full logits, each prompt alone."""
    return [_greedy_reference(backends, p, 20) for p in prompts]


def test_greedy_matches_full_logits_on_both_backends(backends, prompts, greedy_ids,
                                                     tiny_tokenizer):
    # top_k=1 is greedy; batched with left padding (and in chunks of 2) it must equal a decoding
    # of each prompt alone from full logits, and so MLX must equal torch token for token.
    eos = stop_token_ids(tiny_tokenizer)
    params = SamplingParams(max_tokens=20, top_k=1)
    want = [finish(ids, tiny_tokenizer, params, eos) for ids in greedy_ids]
    assert {c.finish_reason for c in want} == {"eos", "length"}
    for name, backend in backends.items():
        together = backend.sample(prompts, params, seed=0)
        chunked = backend.sample(prompts, SamplingParams(max_tokens=20, top_k=1, batch_size=2), 7)
        alone = [backend.sample([p], params, seed=1)[0] for p in prompts]
        assert together == want, name
        assert chunked == want and alone == want, name


def test_stop_string_ends_sampling_on_both_backends(backends, prompts, greedy_ids,
                                                    tiny_tokenizer):
    # A stop string taken from one greedy completion: that row ends there ("stop", text cut
    # right after it), the rows batched with it are untouched; both backends agree.
    eos = stop_token_ids(tiny_tokenizer)
    text = finish(greedy_ids[1], tiny_tokenizer, SamplingParams(max_tokens=20), eos).text
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    params = SamplingParams(max_tokens=20, top_k=1, stop=(text[start:start + 2],))
    want = [finish(ids, tiny_tokenizer, params, eos) for ids in greedy_ids]
    assert want[1].finish_reason == "stop" and len(want[1].ids) < len(greedy_ids[1])
    assert want[1].text == text[:text.index(params.stop[0]) + 2]
    for name, backend in backends.items():
        assert backend.sample(prompts, params, seed=0) == want, name


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_seeded_and_leaves_rng_and_mode_alone(backends, prompts, name):
    import mlx.core as mx
    import torch

    from cuda_ft.model import set_adapter_training

    backend = backends[name]
    params = SamplingParams(max_tokens=8, temperature=1.0)
    many = prompts * 3
    if name == "mlx":
        backend.model.train()
    else:
        set_adapter_training(backend.model, True)
    mlx_rng, torch_rng = np.array(mx.random.state[0]), torch.get_rng_state()
    first = backend.sample(many, params, seed=11)
    assert backend.sample(many, params, seed=11) == first
    assert backend.sample(many, params, seed=12) != first
    assert [c.ids for c in first[:3]] != [c.ids for c in first[3:6]], "repeats differ"
    assert np.array_equal(np.array(mx.random.state[0]), mlx_rng)
    assert torch.equal(torch.get_rng_state(), torch_rng)
    if name == "mlx":
        assert backend.model.training
        backend.model.eval()
    else:
        from peft.tuners.lora import LoraLayer

        assert all(m.training for m in backend.model.modules() if isinstance(m, LoraLayer))
        set_adapter_training(backend.model, False)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_max_tokens_and_errors(backends, prompts, tiny_tokenizer, name):
    backend = backends[name]
    eos = tiny_tokenizer.eos_token_id
    got = backend.sample(prompts * 4, SamplingParams(max_tokens=3, batch_size=5), seed=0)
    assert len(got) == 12 and all(1 <= len(c.ids) <= 3 for c in got)
    assert all(c.truncated == (c.ids[-1] != eos) for c in got)
    assert all(len(c.ids) == 3 for c in got if c.truncated) and any(c.truncated for c in got)
    assert backend.sample([], SamplingParams(max_tokens=3), seed=0) == []
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        backend.sample([prompts[0], []], SamplingParams(max_tokens=3), seed=0)


def _allowed(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0) -> np.ndarray:
    """Boolean mask of the tokens the filter chain keeps (transformers' order and rules)."""
    z = logits / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        above = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[above < top_p]] = True
        keep &= nucleus
    if min_p:
        keep &= p >= min_p * p.max()
    return keep


FILTERS = {"top_k": {"temperature": 1.0, "top_k": 2},
           "top_p": {"temperature": 0.2, "top_p": 0.3},
           "min_p": {"temperature": 0.2, "min_p": 0.3},
           "all": {"temperature": 0.3, "top_k": 6, "top_p": 0.8, "min_p": 0.2}}


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_filters_restrict_first_token(backends, prompts, name):
    # Every first token sampled under a filter is one the filter allows (computed here from the
    # model's full logits); without the filter, at the same temperature, some are not.
    backend, n = backends[name], 24
    rows = [p for p in prompts for _ in range(n)]
    logits = [_full_logits(backends, p) for p in prompts]
    unfiltered: dict[float, np.ndarray] = {}
    for label, options in FILTERS.items():
        allowed = [_allowed(z, **options) for z in logits]
        assert all(0 < a.sum() < a.size for a in allowed), label
        got = backend.sample(rows, SamplingParams(max_tokens=1, **options), seed=3)
        firsts = np.array([c.ids[0] for c in got]).reshape(len(prompts), n)
        assert all(a[f].all() for a, f in zip(allowed, firsts)), label
        t = options["temperature"]
        if t not in unfiltered:
            free = backend.sample(rows, SamplingParams(max_tokens=1, temperature=t), seed=3)
            unfiltered[t] = np.array([c.ids[0] for c in free]).reshape(len(prompts), n)
        assert not all(a[f].all() for a, f in zip(allowed, unfiltered[t])), label


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_sampling_frequencies_follow_tempered_softmax(backends, prompts, name):
    # Temperature then top-k: first-token frequencies match softmax(z / T) renormalised over the
    # top 4 (about .61 .19 .12 .08 here) within 4.5 standard errors, and not softmax(z) (~ .25).
    n = 200

    def expected(temperature):
        p = np.exp((top_z - top_z.max()) / temperature)
        return p / p.sum()

    z = _full_logits(backends, prompts[0])
    top = np.argsort(-z)[:4]
    top_z = z[top]
    got = backends[name].sample([prompts[0]] * n, SamplingParams(
        max_tokens=1, temperature=0.02, top_k=4), seed=5)
    firsts = np.array([c.ids[0] for c in got])
    assert np.isin(firsts, top).all()
    freq = np.array([(firsts == t).mean() for t in top])
    want = expected(0.02)
    np.testing.assert_array_less(np.abs(freq - want), 4.5 * np.sqrt(want * (1 - want) / n))
    assert np.abs(freq - expected(1.0)).max() > 0.2


def test_logps_of_sampled_completions_match_across_backends(backends, prompts, tiny_tokenizer):
    # The RL loss scores rollouts at the sampling temperature: same numbers on MLX and torch.
    temperature = 0.7
    completions = backends["mlx"].sample(prompts * 2, SamplingParams(
        max_tokens=8, temperature=temperature), seed=2)
    rows = [p + c.ids for p, c in zip(prompts * 2, completions)]
    width = max(len(r) for r in rows)
    pad = tiny_tokenizer.pad_token_id
    batch = {k: np.zeros((len(rows), width), dt) for k, dt in
             [("input_ids", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
              ("segment_ids", np.int32)]}
    batch["input_ids"][:] = pad
    batch["targets"][:] = pad
    for i, (row, prompt) in enumerate(zip(rows, prompts * 2)):
        batch["input_ids"][i, :len(row)] = row
        batch["targets"][i, :len(row) - 1] = row[1:]
        batch["loss_mask"][i, len(prompt) - 1:len(row) - 1] = 1
        batch["segment_ids"][i, :len(row)] = 1
    batch["temperature"] = np.float32(temperature)
    got = {name: b.per_token_logps(batch) for name, b in backends.items()}
    mask = batch["loss_mask"] > 0
    assert np.isfinite(got["mlx"][mask]).all() and (got["mlx"][mask] <= 0).all()
    np.testing.assert_allclose(got["mlx"][mask], got["torch"][mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_shared_prompt_prefill_samples_what_per_row_prefill_samples(backends, prompts, greedy_ids,
                                                                    tiny_tokenizer, monkeypatch,
                                                                    name):
    # GRPO groups (each prompt G times, groups of different lengths): prefilling each distinct
    # prompt once and copying its KV cache to the G rows must sample exactly the tokens the
    # per-row prefill samples (seeded, temperature 1) and, greedily, the full-logits oracle.
    backend = backends[name]
    groups = [p for p in prompts for _ in range(3)]
    switch = {"mlx": "POSTTRAIN_MLX_SHARED_PREFILL", "torch": "POSTTRAIN_TORCH_SHARED_PREFILL"}
    params = SamplingParams(max_tokens=12, temperature=1.0)
    greedy = SamplingParams(max_tokens=20, top_k=1)
    shared = backend.sample(groups, params, seed=5)
    shared_greedy = backend.sample(groups, greedy, seed=0)
    chunked = backend.sample(groups, SamplingParams(max_tokens=12, batch_size=4), seed=5)
    monkeypatch.setenv(switch[name], "0")
    assert backend.sample(groups, params, seed=5) == shared
    assert backend.sample(groups, SamplingParams(max_tokens=12, batch_size=4), seed=5) == chunked
    eos = stop_token_ids(tiny_tokenizer)
    want = [finish(ids, tiny_tokenizer, greedy, eos) for ids in greedy_ids for _ in range(3)]
    assert shared_greedy == want
    assert len({tuple(c.ids) for c in shared}) > 3, "the G rows of a group sample apart"


def test_torch_rows_that_cannot_leave_the_batch_ride_along(backends, prompts, monkeypatch):
    """A KV cache that cannot drop rows (cuda_ft.decode._select answers False): finished rows
    stay in the batch, their draws ignored; every completion is the one the shrinking batch
    samples (one seed per prompt)."""
    from cuda_ft import decode

    backend = backends["torch"]
    rows = [p for p in prompts for _ in range(3)]
    params = SamplingParams(max_tokens=16, temperature=1.0)
    seeds = list(range(40, 40 + len(rows)))
    shrinking = backend.sample(rows, params, seed=seeds)
    assert len({len(c.ids) for c in shrinking}) > 1, "rows end at different steps"
    monkeypatch.setattr(decode, "_select", lambda caches, index: False)
    assert backend.sample(rows, params, seed=seeds) == shrinking
