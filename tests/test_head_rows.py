"""Head rows (algorithms.backend, "Head rows"): a loss or a forward call that names the positions
it reads gets the head outputs there, computed only there, and 0 elsewhere; the loss and every
gradient are those of the pass over every position; and every loss that names its positions
really reads nothing outside them."""

from __future__ import annotations

import numpy as np
import pytest
from test_prefix_sharing import OTHER, PROMPT
from tiny import make_batch

from algorithms.backend import Loss, head_rows, with_head_mask
from algorithms.ops import NumpyOps

HEAD = ("logps", "entropy", "log_sum_sq")


def test_head_rows_keeps_the_read_positions_and_maps_the_rest_to_a_zero():
    assert head_rows(None) is None
    assert head_rows(np.ones(5, bool)) is None  # nothing to skip
    keep, inverse = head_rows(np.array([0, 1, 1, 0, 1], bool))
    np.testing.assert_array_equal(keep, [1, 2, 4])
    np.testing.assert_array_equal(inverse, [3, 0, 1, 3, 2])
    out = np.concatenate([np.array([10.0, 20.0, 30.0]), [0.0]])[inverse]
    np.testing.assert_array_equal(out, [0, 10, 20, 0, 30])
    keep, inverse = head_rows(np.zeros(4, bool))  # nothing read: one stand-in row, still 0
    assert len(keep) == 1 and (inverse == 1).all()


def test_with_head_mask_names_a_missing_key_and_can_be_switched_off(monkeypatch):
    batch = {"loss_mask": np.array([[0.0, 1.0]])}
    assert with_head_mask(batch, None) is batch
    np.testing.assert_array_equal(with_head_mask(batch, "loss_mask")["_head_mask"],
                                  [[False, True]])
    with pytest.raises(KeyError, match="completion_mask"):
        with_head_mask(batch, "completion_mask")
    monkeypatch.setenv("POSTTRAIN_HEAD_ROWS", "0")
    assert with_head_mask(batch, "loss_mask") is batch


def _prompted_batch() -> dict:
    """GRPO-like rows (shared prompts, a packed row) whose prompt positions carry no loss."""
    batch = make_batch([[PROMPT + [7, 8, 9]], [PROMPT + [7, 8, 9, 10, 11]], [PROMPT + [60, 61]],
                        [OTHER + [4, 4, 4, 4]], [OTHER + [5]], [[11, 12, 13], PROMPT + [70]]])
    for row in range(5):  # the loss reads the completions only (from the last prompt token)
        batch["loss_mask"][row, :len(PROMPT if row < 3 else OTHER) - 1] = 0
    batch["num_items"] = np.float32(batch["loss_mask"].sum())
    return batch


def _backend(name, model_dir, tokenizer, kind):
    from test_backend_conformance import make_backend

    return make_backend(name, model_dir, tokenizer, fine_tune_type=kind)


@pytest.mark.parametrize("name", ["mlx", "torch"])
@pytest.mark.parametrize("layout", ["padding_free", "shared_prefix", "padded"])
def test_forward_at_positions_equals_the_full_pass_there_and_is_zero_elsewhere(
        name, layout, tiny_llama_dir, tiny_tokenizer, monkeypatch):
    for backend_name in ("MLX", "TORCH"):
        monkeypatch.setenv(f"POSTTRAIN_{backend_name}_VARLEN", "0" if layout == "padded" else "1")
        monkeypatch.setenv(f"POSTTRAIN_{backend_name}_SHARED_PREFIX",
                           "1" if layout == "shared_prefix" else "0")
    backend = _backend(name, tiny_llama_dir, tiny_tokenizer, "lora")
    batch = _prompted_batch()
    batch["temperature"] = np.float32(0.7)
    read = batch["loss_mask"] > 0
    for reference in (False, True):
        every = backend.forward(batch, HEAD, reference=reference)
        some = backend.forward(with_head_mask(batch, "loss_mask"), HEAD, reference=reference)
        for key in HEAD:
            np.testing.assert_allclose(some[key][read], every[key][read], atol=2e-6,
                                       err_msg=key)
            assert not some[key][~read].any(), key
            assert np.abs(every[key][~read]).max() > 1e-3  # the full pass has values there


def _reads(entropy_grad: bool, positions: str | None) -> Loss:
    """Token-mean NLL plus a (weighted) entropy term, both over loss_mask."""

    def fn(ops, outputs, batch):
        mask = batch["loss_mask"]
        nll = -ops.sum(outputs["logps"] * mask) / batch["num_items"]
        ent = ops.sum(outputs["entropy"] * mask) / batch["num_items"]
        return nll - 0.1 * ent, {"entropy": ops.stop_gradient(ent)}

    return Loss(fn, {"logps": True, "entropy": entropy_grad}, positions)


@pytest.mark.parametrize("name", ["mlx", "torch"])
@pytest.mark.parametrize("kind,entropy_grad", [("lora", False), ("full", True)])
def test_loss_and_gradients_at_positions_equal_the_full_pass(name, kind, entropy_grad,
                                                             tiny_llama_dir, tiny_tokenizer,
                                                             monkeypatch):
    """LoRA with detached entropy takes the fused head, full fine-tuning with an entropy
    gradient the checkpointed one: on both, naming the positions changes nothing but the work."""
    from test_backend_conformance import grads

    module = __import__("mlx_ft.logprobs" if name == "mlx" else "cuda_ft.logprobs",
                        fromlist=["head_outputs"])
    batch = _prompted_batch()
    results, head_rows_run = [], []
    real = module.head_outputs

    def counted(hidden, *args, **kwargs):
        head_rows_run.append(int(hidden.shape[0]) if name == "torch" else int(args[0].shape[0]))
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(module, "head_outputs", counted)
    for positions in (None, "loss_mask"):
        backend = _backend(name, tiny_llama_dir, tiny_tokenizer, kind)
        backend.forward_backward(batch, _reads(entropy_grad, positions))
        backend.optimizer_step(1e-2, 1.0)  # LoRA B leaves 0: dL/dA is no longer zero
        metrics = backend.forward_backward(batch, _reads(entropy_grad, positions))
        results.append((metrics, grads(backend)))
    real_tokens = int((batch["segment_ids"] > 0).sum())
    assert head_rows_run == [real_tokens] * 2 + [int(batch["loss_mask"].sum())] * 2
    (m_all, g_all), (m_some, g_some) = results
    assert m_some["loss"] == pytest.approx(m_all["loss"], rel=1e-5)
    assert m_some["entropy"] == pytest.approx(m_all["entropy"], rel=1e-5)
    for key, want in g_all.items():
        assert np.abs(want).max() > 0, key
        np.testing.assert_allclose(g_some[key], want, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("kind,entropy_grad", [("lora", False), ("full", True)])
def test_mlx_head_on_every_position_when_few_are_skipped_equals_the_gathered_one(
        kind, entropy_grad, tiny_llama_dir, tiny_tokenizer, monkeypatch):
    """Below mlx_ft.logprobs.DENSE_SKIPPED the head runs on every position and zeroes the
    skipped ones instead of gathering: the same outputs, zeros, loss and gradients."""
    from test_backend_conformance import grads

    from mlx_ft import logprobs

    batch = _prompted_batch()
    read = batch["loss_mask"] > 0
    results = []
    for dense in (0.0, 1.0):
        monkeypatch.setattr(logprobs, "DENSE_SKIPPED", dense)
        backend = _backend("mlx", tiny_llama_dir, tiny_tokenizer, kind)
        some = backend.forward(with_head_mask(batch, "loss_mask"), HEAD)
        assert not any(some[key][~read].any() for key in HEAD)
        backend.forward_backward(batch, _reads(entropy_grad, "loss_mask"))
        backend.optimizer_step(1e-2, 1.0)
        metrics = backend.forward_backward(batch, _reads(entropy_grad, "loss_mask"))
        results.append((some, metrics, grads(backend)))
    (out_g, m_g, g_g), (out_d, m_d, g_d) = results
    for key in HEAD:
        np.testing.assert_allclose(out_d[key], out_g[key], atol=2e-6, err_msg=key)
    assert m_d["loss"] == pytest.approx(m_g["loss"], rel=1e-6)
    for key, want in g_g.items():
        np.testing.assert_allclose(g_d[key], want, rtol=1e-4, atol=1e-6, err_msg=key)


# --- every loss that names its positions reads nothing outside them ---------------------------
def _junk_outside(arrays: dict, mask: np.ndarray, rng) -> dict:
    """``arrays`` with random values (0 when ``rng`` is None) where ``mask`` is 0."""
    return {k: np.where(mask > 0, v, 0.0 if rng is None else rng.normal(size=v.shape) * 5)
            for k, v in arrays.items()}


def _opted_in_losses():
    """(name, loss, outputs, batch): SFT, every DPO loss type, SimPO / CPO, KTO, BCO, online DPO,
    XPO, Nash-MD, every GRPO loss type at token and sequence level."""
    from test_preference_losses import LOGPS, MASK, REF

    from algorithms.preference import bco, cpo, dpo, kto
    from algorithms.preference.dpo import LOSS_TYPES as DPO_TYPES
    from algorithms.rl.config import LOSS_TYPES as RL_TYPES
    from algorithms.rl.policy_loss import make_loss as rl_loss
    from algorithms.rl.presets import GRPOConfig
    from algorithms.sft import SFTConfig
    from algorithms.sft import make_loss as sft_loss

    pref = {"loss_mask": MASK, "ref_per_token_logps": REF, "num_items": np.float64(MASK.sum())}
    head = {"logps": LOGPS, "log_sum_sq": -np.ones_like(LOGPS), "entropy": np.ones_like(LOGPS)}
    for kind in ("nll", "dft"):
        yield f"sft_{kind}", sft_loss(SFTConfig(data="x", loss_type=kind)), head, pref
    for kind in DPO_TYPES:
        eps = 0.1 if kind in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
        cfg = dpo.DPOConfig(data="x", loss_type=[kind], label_smoothing=eps, ld_alpha=0.5)
        yield f"dpo_{kind}", dpo.make_loss(cfg), head, pref
    yield "dpo_wpo", dpo.make_loss(dpo.DPOConfig(data="x", use_weighting=True)), head, pref
    yield "simpo", cpo.make_loss(cpo.SimPOConfig(data="x", alpha=0.5)), head, pref
    yield "cpo", cpo.make_loss(cpo.CPOConfig(data="x")), head, pref
    kto_logps = np.array([[-1.0, -1.0, -3.0], [-2.0, -0.5, -1.0], [-0.5, -0.5, 2.0],
                          [-3.0, -4.0, -1.0]])
    unpaired = {"loss_mask": np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0],
                                       [1.0, 0.0, 0.0]]),
                "ref_per_token_logps": kto_logps + 0.25, "label": np.array([1.0, 0.0, 1.0, 0.0]),
                "kl_estimate": np.float32(0.1), "num_items": np.float64(8.0)}
    for kind in ("kto", "apo_zero_unpaired"):
        yield f"kto_{kind}", kto.make_loss(kto.KTOConfig(data="x", loss_type=kind)), \
            {"logps": kto_logps}, unpaired
    yield "bco", bco.make_loss(bco.BCOConfig(data="x")), {"logps": kto_logps}, \
        {**unpaired, "bco_reward_mean": np.float32(0.05)}
    from algorithms.online_preference import config as online
    from algorithms.online_preference.losses import make_nash_md_loss, make_pair_loss

    pairs = {**pref, "pair_weight": np.array([1.0, 0.5]), "from_second": np.array([0, 1, 1, 0.0]),
             "preference": np.array([0.7, 0.2, 0.5, 0.9])}
    for kind in ("sigmoid", "ipo"):
        yield f"online_dpo_{kind}", make_pair_loss(online.OnlineDPOConfig(
            data="x", reward=["r"], loss_type=kind)), head, pairs
    yield "xpo", make_pair_loss(online.XPOConfig(data="x", reward=["r"], alpha=0.1)), head, pairs
    for level in ("sequence", "token"):
        yield f"nash_md_{level}", make_nash_md_loss(online.NashMDConfig(
            data="x", reward=["r"], kl_level=level)), head, pairs
    logp = LOGPS[:2]
    mask = MASK[:2]
    rl = {"loss_mask": mask, "advantages": np.array([1.5, -0.5]),
          "old_per_token_logps": logp - 0.2, "ref_per_token_logps": logp + 0.3,
          "num_items": np.float64(mask.sum()), "micro_fraction": np.float64(0.5)}
    for kind in RL_TYPES:
        for level in ("token", "sequence"):
            cfg = GRPOConfig(data="x", reward=["r"], max_completion_length=3, beta=0.04,
                             loss_type=kind, importance_sampling_level=level, entropy_coef=0.01)
            yield f"grpo_{kind}_{level}", rl_loss(cfg), \
                {"logps": logp, "entropy": np.ones_like(logp)}, rl


@pytest.mark.parametrize("case", list(_opted_in_losses()), ids=lambda c: c[0])
def test_opted_in_losses_read_nothing_outside_their_positions(case):
    name, loss, outputs, batch = case
    assert loss.positions == "loss_mask", name
    outputs = {k: v for k, v in outputs.items() if k in loss.outputs}
    mask = batch[loss.positions]
    # what the backends leave outside the positions: 0 in the outputs and in the per-token
    # arrays of earlier passes (reference, old policy) computed at the same positions
    per_token = [k for k in ("ref_per_token_logps", "old_per_token_logps") if k in batch]
    zeros = {k: np.where(mask > 0, v, 0.0) for k, v in outputs.items()}
    want, want_metrics = loss(NumpyOps(), zeros,
                              {**batch, **_junk_outside({k: batch[k] for k in per_token},
                                                        mask, None)})
    rng = np.random.default_rng(0)
    for _ in range(3):
        junk = {**batch, **_junk_outside({k: batch[k] for k in per_token}, mask, rng)}
        got, metrics = loss(NumpyOps(), _junk_outside(outputs, mask, rng), junk)
        assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-12), name
        for key, value in want_metrics.items():
            assert float(metrics[key]) == pytest.approx(float(value), rel=1e-12, abs=1e-12), \
                f"{name}: {key}"
