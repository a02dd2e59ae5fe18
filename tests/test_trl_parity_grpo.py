"""TRL parity tier, online RL: our GRPO-family policy loss against TRL's ``GRPOTrainer._compute_loss``
on the same fixed completions, advantages, sampling (old) and reference log-probs.

Sampling and rewards are random or pluggable on both sides, so the tier fixes what they would
produce: 6 completions of different lengths (right-padded; the prompts share a length, so TRL's
left padding is empty and both sides see the same positions), advantages of both signs, old
log-probs = the current ones + noise (so the ratio leaves [1 - eps, 1 + eps_high] both ways and
clipping acts), reference log-probs, temperature 0.7. Compared, per loss type and importance
sampling level, with and without TRL's default importance-weighted KL (``use_bias_correction_kl``;
ours is off by default, DeepSeekMath's k3 term): the loss, the KL and clip-ratio metrics, and the
gradient of every weight (torch rel 1e-5, MLX rel 1e-4; a gradient entry against its tensor's
largest).

RLOO: TRL 1.16's ``RLOOTrainer._compute_loss`` on the same ids, masks and advantages, with
SEQUENCE-level ``old_logps`` [n] (sum over the completion), one clipped ratio per completion,
against our ``rloo`` preset (``importance_sampling_level=sequence_sum``). Its advantages
(leave-one-out over the scorable siblings, the first-order KL summed per completion subtracted
from the reward) are pinned by hand in tests/test_rl_estimators.py. TRL 1.16 has no PPO
trainer: PPO's losses and GAE are pinned by hand (tests/test_rl_loss_ppo.py,
tests/test_rl_estimators.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import trl_parity as tp

pytestmark = pytest.mark.trl_parity
pytest.importorskip("trl")
torch = pytest.importorskip("torch")

LENGTHS, MAX_COMPLETION = tp.LENGTHS, tp.MAX_COMPLETION
TEMPERATURE = 0.7
BETA, EPS, EPS_HIGH = 0.04, 0.2, 0.28
RTOL = {"torch": 1e-5, "mlx": 1e-4}
# (loss type, importance sampling level, use_bias_correction_kl)
VARIANTS = [("grpo", "token", False), ("bnpo", "token", False), ("dr_grpo", "token", False),
            ("dapo", "token", False), ("grpo", "sequence", False), ("grpo", "token", True),
            ("dapo", "sequence", True), ("cispo", "token", False), ("sapo", "token", True),
            ("luspo", "sequence", False), ("vespo", "token", False)]
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def trl_epsilon_high(loss_type):
    """TRL's cispo caps the ratio at ``epsilon_high`` itself; ours (MiniMax-M1) at
    ``1 + epsilon_high``: the same cap is TRL's value plus one."""
    return EPS_HIGH + 1.0 if loss_type == "cispo" else EPS_HIGH


def trl_side(model_dir, tmp_path, loss_type, level, corrected):
    """TRL's loss, metrics and per-parameter gradients on the fixed batch, plus the old and
    reference log-probs it was given ([n, MAX_COMPLETION], aligned with the completions)."""
    import logging
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n = len(LENGTHS)
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, num_generations=n,
        max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, beta=BETA, epsilon=EPS,
        epsilon_high=trl_epsilon_high(loss_type), loss_type=loss_type, importance_sampling_level=level,
        use_bias_correction_kl=corrected, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        logging_steps=1, save_strategy="no", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, args=args, processing_class=tok,
                              reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                              train_dataset=Dataset.from_list([{"prompt": "x"}] * n))
    prompt, completion, mask, advantages = tp.fixed_batch(model.config.vocab_size,
                                                          tok.pad_token_id)
    inputs = {"prompt_ids": torch.tensor(prompt), "prompt_mask": torch.ones_like(torch.tensor(prompt)),
              "completion_ids": torch.tensor(completion), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(advantages),
              "num_items_in_batch": torch.tensor(float(mask.sum()))}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att,
                                                                    MAX_COMPLETION)
    rng = np.random.default_rng(11)
    noise = torch.tensor(rng.uniform(-0.45, 0.45, size=mask.shape), dtype=torch.float32)
    inputs["old_per_token_logps"] = (current + noise) * inputs["completion_mask"]
    ref_noise = torch.tensor(rng.normal(0, 0.3, size=mask.shape), dtype=torch.float32)
    inputs["ref_per_token_logps"] = (current + ref_noise) * inputs["completion_mask"]
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in trainer.model.named_parameters()
             if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return (float(loss.detach()), metrics, grads, inputs["old_per_token_logps"].numpy(),
            inputs["ref_per_token_logps"].numpy())


def our_side(backend_name, model_dir, batch, loss_type, level, corrected):
    from algorithms.cli import load_tokenizer
    from algorithms.rl import policy_loss
    from algorithms.rl.presets import GRPOConfig

    cfg = GRPOConfig(data="unused", fine_tune_type="full", dtype="float32", beta=BETA,
                     epsilon=EPS, epsilon_high=EPS_HIGH, loss_type=loss_type,
                     importance_sampling_level=level, max_completion_length=MAX_COMPLETION,
                     use_bias_correction_kl=corrected,
                     temperature=TEMPERATURE, max_length=64)
    tokenizer = load_tokenizer(model_dir)
    if backend_name == "mlx":
        pytest.importorskip("mlx")
        from mlx.utils import tree_flatten

        from mlx_ft.backend import MLXBackend

        backend = MLXBackend(cfg, model_dir, tokenizer)
        metrics = backend.forward_backward(batch, policy_loss.make_loss(cfg))
        grads = {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    else:
        from cuda_ft.backend import TorchBackend

        backend = TorchBackend(cfg, model_dir, tokenizer)
        metrics = backend.forward_backward(batch, policy_loss.make_loss(cfg))
        grads = {k: p.grad.numpy() for k, p in backend.params.items() if p.grad is not None}
    return metrics, grads


_TRL: dict = {}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize(("loss_type", "level", "corrected"), VARIANTS)
def test_grpo_loss_and_gradient_match_trl(loss_type, level, corrected, backend, tiny_llama_dir,
                                          tmp_path):
    key = (loss_type, level, corrected)
    if key not in _TRL:
        _TRL[key] = trl_side(tiny_llama_dir, tmp_path, loss_type, level, corrected)
    trl_loss, trl_metrics, trl_grads, old, ref = _TRL[key]
    batch = tp.online_rows(tiny_llama_dir, {"old_per_token_logps": old, "ref_per_token_logps": ref})
    batch.update(temperature=np.float32(TEMPERATURE), micro_fraction=np.float32(1.0))
    ours, grads = our_side(backend, tiny_llama_dir, batch, loss_type, level, corrected)
    rtol = RTOL[backend]
    label = (f"{loss_type}/{level}{'/kl-corrected' if corrected else ''} on {backend} "
             f"vs TRL {tp.trl_version()}")
    assert ours["loss"] == pytest.approx(trl_loss, rel=rtol), label
    assert ours["kl"] == pytest.approx(trl_metrics["kl"], rel=rtol), label
    if level == "token" and loss_type in CLIPPED:
        # the batch must exercise both clip sides, or agreeing on them proves little
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert ours[name] == pytest.approx(trl_metrics[name], rel=rtol, abs=1e-7), (label, name)
    assert set(grads) == set(trl_grads), label
    worst = 0.0
    for name, want in trl_grads.items():
        scale = max(np.abs(want).max(), 1e-12)
        worst = max(worst, float(np.abs(grads[name] - want).max() / scale))
    print(f"{label}: loss {abs(ours['loss'] - trl_loss) / abs(trl_loss):.1e}, "
          f"grad {worst:.1e}")
    assert worst <= rtol, label


# --- RLOO: TRL's RLOOTrainer._compute_loss (one clipped ratio per completion) ------------------

def trl_rloo_side(model_dir, tmp_path):
    """TRL's RLOO loss, clip metrics and gradients on the fixed batch; the sequence-level old
    log-probs it was given ([n], the current ones + noise) and their per-token form."""
    import logging
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n = len(LENGTHS)
    args = RLOOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, num_generations=n,
        max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, beta=0.0, epsilon=EPS,
        epsilon_high=EPS_HIGH, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RLOOTrainer(model=model, args=args, processing_class=tok,
                              reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                              train_dataset=Dataset.from_list([{"prompt": "x"}] * n))
    prompt, completion, mask, advantages = tp.fixed_batch(model.config.vocab_size,
                                                          tok.pad_token_id)
    inputs = {"prompt_ids": torch.tensor(prompt), "prompt_mask": torch.ones_like(torch.tensor(prompt)),
              "completion_ids": torch.tensor(completion), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(advantages)}
    trainer.model.train()
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att,
                                                                    MAX_COMPLETION)
    # per-token noise whose sums push ratios out of [1 - eps, 1 + eps_high] both ways
    noise = np.random.default_rng(12).uniform(-0.25, 0.25, size=mask.shape) * mask
    old_per_token = (current.numpy() + noise) * mask
    inputs["old_logps"] = torch.tensor(old_per_token.sum(1), dtype=torch.float32)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in trainer.model.named_parameters()
             if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return float(loss.detach()), metrics, grads, old_per_token.astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_rloo_loss_and_gradient_match_trl(backend, tiny_llama_dir, tmp_path):
    """Our ``rloo`` preset's loss (the whole completion's probability ratio, clipped, mean over
    completions) against TRL's RLOO on the same advantages and rollout log-probs. The
    advantages themselves (leave-one-out, KL summed in the reward) are pinned by hand in
    tests/test_rl_estimators.py, with TRL's formula."""
    from algorithms.cli import load_backend_class, load_tokenizer
    from algorithms.rl import policy_loss
    from algorithms.rl.presets import RLOOConfig

    trl_loss, trl_metrics, trl_grads, old = trl_rloo_side(tiny_llama_dir, tmp_path)
    batch = tp.online_rows(tiny_llama_dir, {"old_per_token_logps": old})
    batch.update(temperature=np.float32(TEMPERATURE), micro_fraction=np.float32(1.0))
    cfg = RLOOConfig(data="unused", fine_tune_type="full", dtype="float32", beta=0.0,
                     epsilon=EPS, epsilon_high=EPS_HIGH, num_iterations=2,
                     max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE,
                     max_length=64)
    spec = {"torch": "cuda_ft.backend:TorchBackend", "mlx": "mlx_ft.backend:MLXBackend"}[backend]
    if backend == "mlx":
        pytest.importorskip("mlx")
    model = load_backend_class(spec)(cfg, tiny_llama_dir, load_tokenizer(tiny_llama_dir))
    ours = model.forward_backward(batch, policy_loss.make_loss(cfg))
    if backend == "mlx":
        from mlx.utils import tree_flatten

        grads = {k: np.array(v) for k, v in tree_flatten(model._grads)}
    else:
        grads = {k: p.grad.numpy() for k, p in model.params.items() if p.grad is not None}
    rtol = RTOL[backend]
    assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
    assert ours["loss"] == pytest.approx(trl_loss, rel=rtol)
    # (TRL's clip ratios count completions, ours tokens: not compared)
    clipped = ours["clip_ratio/region_mean"] * batch["loss_mask"].sum()
    assert set(grads) == set(trl_grads)
    worst = max(float(np.abs(grads[k] - w).max() / max(np.abs(w).max(), 1e-12))
                for k, w in trl_grads.items())
    print(f"rloo on {backend} vs TRL {tp.trl_version()}: loss "
          f"{abs(ours['loss'] - trl_loss) / abs(trl_loss):.1e}, grad {worst:.1e}, "
          f"clipped tokens {clipped:.0f}")
    assert worst <= rtol
