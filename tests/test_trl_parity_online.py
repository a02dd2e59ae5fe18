"""TRL parity tier, online preference learning and distillation: our online DPO loss against
TRL's ``OnlineDPOTrainer.training_step``, our GKD loss against ``GKDTrainer.compute_loss``, on
the same completions.

GKD: 4 prompt + completion rows (right-padded, labels -100 on prompt and padding), the tiny
Llama as student and the tiny Qwen2 as teacher (full fine-tuning, float32): TRL's full-logits
generalised JSD (beta 0.4) against our chunked ``teacher_divergence`` output, the loss and every
gradient.

TRL samples its two completions per prompt inside ``training_step``; the tier replaces its
``_generate`` with fixed completions (6 prompts x 2, different lengths, right-padded; prompts
of one length, so no left padding), scores them with the same deterministic reward function
(TRL ranks them: ties to the first), then feeds our loss the same pairs, chosen first, with the
same reference model (the tiny Qwen2, so that the rewards are not 0) and compares the loss,
TRL's logged rewards,
margins, accuracies and log-probs, and every weight's gradient (full fine-tuning, float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import trl_parity as tp

pytestmark = pytest.mark.trl_parity
pytest.importorskip("trl")
torch = pytest.importorskip("torch")

PROMPTS, PROMPT_LEN, MAX_COMPLETION = 6, 5, 9
LENGTHS = [7, 3, 9, 5, 9, 1, 4, 8, 2, 9, 6, 6]  # first completions, then the second ones
BETA = 0.1
RTOL = {"torch": 1e-5, "mlx": 1e-4}


def _completions(vocab, pad):
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, vocab, size=(PROMPTS, PROMPT_LEN))
    completion = np.full((2 * PROMPTS, MAX_COMPLETION), pad)
    mask = np.zeros((2 * PROMPTS, MAX_COMPLETION), dtype=np.int64)
    for i, n in enumerate(LENGTHS):
        completion[i, :n] = rng.integers(3, vocab, size=n)
        mask[i, :n] = 1
    return prompt, completion, mask


def reward(prompts, completions, completion_ids=None, **kwargs):
    """Deterministic and blind to right padding (pad id 0; TRL passes padded ids): pairs 0 and 2
    prefer the second completion, pair 3 is a tie."""
    return [float(sum(ids) % 3) for ids in completion_ids]


def trl_side(model_dir, ref_dir, tmp_path, loss_type):
    import logging
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = OnlineDPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PROMPTS,
                           max_new_tokens=MAX_COMPLETION, beta=BETA, loss_type=loss_type,
                           use_cpu=True, bf16=False, fp16=False, report_to="none",
                           logging_steps=1, save_strategy="no", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
        trainer = OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=reward, args=args,
                                   train_dataset=Dataset.from_list([{"prompt": "x"}] * PROMPTS),
                                   processing_class=tok)
    prompt, completion, mask = _completions(model.config.vocab_size, tok.pad_token_id)

    def fixed(model, prompts, images=None):
        ids = torch.tensor(prompt).repeat(2, 1)
        return ids, torch.ones_like(ids), torch.tensor(completion), torch.tensor(mask), None

    trainer._generate = fixed
    trainer.model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.training_step(trainer.model, {"prompt": ["x"] * PROMPTS})
    grads = {k: p.grad.detach().numpy().copy() for k, p in trainer.model.named_parameters()
             if p.grad is not None}
    stats = {k: v[-1] for k, v in trainer.stats.items() if v}
    return float(loss), stats, grads


def our_batch(model_dir):
    """The same pairs in our layout: prompt + completion rows, chosen rows first (TRL's ranking:
    the first completion wins ties), the loss mask on the completion targets."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    prompt, completion, mask = _completions(vocab, tok.pad_token_id)
    scores = np.array(reward(None, None, [c[m > 0] for c, m in zip(completion, mask)]))
    first_wins = scores[:PROMPTS] >= scores[PROMPTS:]
    assert (scores[:PROMPTS] == scores[PROMPTS:]).any(), "the batch must hold a tie"
    chosen = [k if first_wins[k] else PROMPTS + k for k in range(PROMPTS)]
    rejected = [PROMPTS + k if first_wins[k] else k for k in range(PROMPTS)]
    order = chosen + rejected
    width = PROMPT_LEN + MAX_COMPLETION
    ids = np.concatenate([np.tile(prompt, (2, 1)), completion], 1)[order].astype(np.int32)
    targets = np.full_like(ids, tok.pad_token_id)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, PROMPT_LEN - 1:-1] = mask[order]
    segment = np.zeros_like(ids)
    for r, i in enumerate(order):
        segment[r, :PROMPT_LEN + LENGTHS[i]] = 1
    assert ids.shape[1] == width
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment,
            "micro_fraction": np.float32(1.0), "temperature": np.float32(1.0)}


def our_side(backend_name, model_dir, ref_dir, loss_type):
    from algorithms.cli import load_tokenizer
    from algorithms.online_preference.config import OnlineDPOConfig
    from algorithms.online_preference.losses import make_pair_loss

    cfg = OnlineDPOConfig(data="unused", reward=["r"], fine_tune_type="full", dtype="float32",
                          beta=BETA, loss_type=loss_type, max_length=64,
                          ref_model=str(ref_dir))
    tokenizer = load_tokenizer(model_dir)
    batch = our_batch(model_dir)
    if backend_name == "mlx":
        pytest.importorskip("mlx")
        from mlx.utils import tree_flatten

        from mlx_ft.backend import MLXBackend

        backend = MLXBackend(cfg, model_dir, tokenizer)
        batch["ref_per_token_logps"] = backend.reference_per_token_logps(batch)
        metrics = backend.forward_backward(batch, make_pair_loss(cfg))
        grads = {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    else:
        from cuda_ft.backend import TorchBackend

        backend = TorchBackend(cfg, model_dir, tokenizer)
        batch["ref_per_token_logps"] = backend.reference_per_token_logps(batch)
        metrics = backend.forward_backward(batch, make_pair_loss(cfg))
        grads = {k: p.grad.numpy() for k, p in backend.params.items() if p.grad is not None}
    return metrics, grads


_TRL: dict = {}
# ours -> TRL's logged name
NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
         "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies",
         "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected"}
# not compared: TRL's objective/kl sums log pi - log ref over the padding after each
# completion too (ours over the completion's tokens only)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_loss_and_gradient_match_trl(loss_type, backend, tiny_llama_dir,
                                                tiny_qwen2_dir, tmp_path):
    if loss_type not in _TRL:
        _TRL[loss_type] = trl_side(tiny_llama_dir, tiny_qwen2_dir, tmp_path, loss_type)
    trl_loss, stats, trl_grads = _TRL[loss_type]
    assert abs(stats["rewards/margins"]) > 1e-3  # the reference (tiny Qwen2) is not the policy
    ours, grads = our_side(backend, tiny_llama_dir, tiny_qwen2_dir, loss_type)
    rtol = RTOL[backend]
    label = f"online_dpo/{loss_type} on {backend} vs TRL {tp.trl_version()}"
    assert ours["loss"] == pytest.approx(trl_loss, rel=rtol), label
    # log-prob sums are ~-40: their differences carry that size's rounding
    scale = max(abs(stats["logps/chosen"]), abs(stats["logps/rejected"]))
    for key, theirs in NAMES.items():
        assert ours[key] == pytest.approx(stats[theirs], rel=rtol, abs=rtol * scale), (label, key)
    assert set(grads) == set(trl_grads), label
    worst = 0.0
    for name, want in trl_grads.items():
        worst = max(worst, float(np.abs(grads[name] - want).max() / np.abs(want).max()))
    print(f"{label}: loss {abs(ours['loss'] - trl_loss) / abs(trl_loss):.1e}, grad {worst:.1e}")
    assert worst <= rtol, label


# -- GKD ------------------------------------------------------------------------------------

GKD_ROWS, GKD_BETA, GKD_PROMPT = 4, 0.4, 5
GKD_LENGTHS = [7, 3, 9, 5]


def _gkd_rows(vocab, pad):
    """Prompt (5 tokens) + completion rows, right-padded, as TRL's collator gives them:
    ``labels`` -100 on the prompt and the padding."""
    rng = np.random.default_rng(5)
    width = GKD_PROMPT + max(GKD_LENGTHS)
    ids = np.full((GKD_ROWS, width), pad)
    attention = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for r, n in enumerate(GKD_LENGTHS):
        ids[r, :GKD_PROMPT + n] = rng.integers(3, vocab, GKD_PROMPT + n)
        attention[r, :GKD_PROMPT + n] = 1
        labels[r, GKD_PROMPT:GKD_PROMPT + n] = ids[r, GKD_PROMPT:GKD_PROMPT + n]
    return ids, attention, labels


def gkd_trl_side(student_dir, teacher_dir, tmp_path):
    """TRL's GKDTrainer.compute_loss (the full-logits generalised JSD over the labelled tokens)
    and every gradient."""
    import logging
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    args = GKDConfig(output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=GKD_ROWS,
                     beta=GKD_BETA, use_cpu=True, bf16=False, fp16=False, report_to="none",
                     save_strategy="no", seed=0, gradient_checkpointing=False)
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}] * GKD_ROWS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    ids, attention, labels = _gkd_rows(model.config.vocab_size, tok.pad_token_id)
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention),
              "labels": torch.tensor(labels)}
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in trainer.model.named_parameters()
             if p.grad is not None}
    return float(loss.detach()), grads


def gkd_our_side(backend_name, student_dir, teacher_dir):
    from transformers import AutoConfig, AutoTokenizer

    from algorithms.cli import load_tokenizer
    from algorithms.distill.config import GKDConfig
    from algorithms.distill.loss import make_loss

    tok = AutoTokenizer.from_pretrained(str(student_dir))
    vocab = AutoConfig.from_pretrained(str(student_dir)).vocab_size
    ids, attention, labels = _gkd_rows(vocab, tok.pad_token_id)
    targets = np.full_like(ids, tok.pad_token_id)
    targets[:, :-1] = ids[:, 1:]
    mask = np.zeros(ids.shape, np.float32)
    mask[:, :-1] = labels[:, 1:] != -100
    batch = {"input_ids": ids.astype(np.int32), "targets": targets.astype(np.int32),
             "loss_mask": mask, "segment_ids": attention.astype(np.int32),
             "jsd_beta": np.float32(GKD_BETA), "temperature": np.float32(1.0),
             "num_items": np.float32(mask.sum())}
    cfg = GKDConfig(data="unused", teacher=str(teacher_dir), fine_tune_type="full",
                    dtype="float32", beta=GKD_BETA, max_length=64)
    tokenizer = load_tokenizer(student_dir)
    if backend_name == "mlx":
        pytest.importorskip("mlx")
        from mlx.utils import tree_flatten

        from mlx_ft.backend import MLXBackend

        backend = MLXBackend(cfg, student_dir, tokenizer)
        metrics = backend.forward_backward(batch, make_loss(cfg))
        return metrics, {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    from cuda_ft.backend import TorchBackend

    backend = TorchBackend(cfg, student_dir, tokenizer)
    metrics = backend.forward_backward(batch, make_loss(cfg))
    return metrics, {k: p.grad.numpy() for k, p in backend.params.items() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_gkd_loss_and_gradient_match_trl(backend, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    if "gkd" not in _TRL:
        _TRL["gkd"] = gkd_trl_side(tiny_llama_dir, tiny_qwen2_dir, tmp_path)
    trl_loss, trl_grads = _TRL["gkd"]
    ours, grads = gkd_our_side(backend, tiny_llama_dir, tiny_qwen2_dir)
    rtol = RTOL[backend]
    label = f"gkd beta {GKD_BETA} on {backend} vs TRL {tp.trl_version()}"
    assert ours["loss"] == pytest.approx(trl_loss, rel=rtol), label
    assert set(grads) == set(trl_grads), label
    worst = 0.0
    for name, want in trl_grads.items():
        worst = max(worst, float(np.abs(grads[name] - want).max() / np.abs(want).max()))
    print(f"{label}: loss {abs(ours['loss'] - trl_loss) / abs(trl_loss):.1e}, grad {worst:.1e}")
    assert worst <= rtol, label
