"""The backend boundary: what the algorithm layer asks of ``mlx_ft`` and ``cuda_ft``.

A backend owns a model (with its adapters), an optimiser and their state. The algorithm layer
hands it numpy batches and a loss function written against the array-ops shim
(:mod:`algorithms.ops`); the backend computes per-token log-probs, evaluates the loss, and does
the update. Numbers must agree across backends, so the few choices that affect them (LoRA init,
attention masks, the batch layout) are made here, once, in numpy.

Batch layout (every array is ``[B, T]``, produced by :mod:`algorithms.data`):

- ``input_ids``   int32: tokens fed to the model.
- ``targets``     int32: the token each position predicts (``input_ids`` shifted left by one
  inside each document; the last position of a document holds a pad id and is masked).
- ``loss_mask``   float32: 1 where ``targets`` carries loss.
- ``segment_ids`` int32: document index inside the row, 1-based; 0 marks padding. A token
  attends only to earlier tokens of its own segment, so packed documents are isolated.
- ``num_items``   float32 scalar (added by the loop): loss tokens in the whole accumulated step,
  the denominator that makes a token mean over the accumulated batch.
- ``temperature`` float32 scalar (optional, online RL): every log-prob, entropy and reference
  log-prob of the batch is taken under ``softmax(logits / temperature)``, the sampling
  distribution, so the importance ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

# A loss function: (ops, per_token_logps [B, T], batch) -> (scalar loss, {name: scalar}).
LossFn = Callable[[Any, Any, dict], tuple[Any, dict]]

# Linear layers of a transformer block adapted by default (llama / qwen / mistral / gemma / phi3
# names). Backends adapt every linear layer inside the blocks; this list only documents them.
COMMON_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "qkv_proj", "gate_up_proj", "dense", "fc1", "fc2")


class Backend(Protocol):
    """What the shared training loop needs from a backend."""

    name: str
    ops: Any          # the array-ops shim (algorithms.ops.ArrayOps)
    tokenizer: Any    # a Hugging Face tokenizer (the same on every backend)

    def forward_backward(self, batch: dict[str, np.ndarray], loss_fn: LossFn) -> dict[str, float]:
        """Loss and gradients of one micro-batch; gradients are summed until optimizer_step."""

    def evaluate(self, batch: dict[str, np.ndarray], loss_fn: LossFn) -> dict[str, float]:
        """Loss metrics of one micro-batch without gradients or dropout."""

    def optimizer_step(self, learning_rate: float, max_grad_norm: float) -> float:
        """Clip the summed gradients by global norm, apply AdamW, zero them; returns the norm."""

    def per_token_logps(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """log p(targets[b, t] | input_ids[b, :t+1]) as float32 ``[B, T]`` (no gradient)."""

    def per_token_entropy(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Entropy of the next-token distribution at every position, no gradient."""

    def per_token_log_sum_sq(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``log sum_v p_v^2`` at every position under the policy, no gradient (WPO weights)."""

    def reference_per_token_logps(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``per_token_logps`` under the reference policy: the base model with adapters disabled
        (LoRA/DoRA, no second copy), a frozen copy of the start (full), or ``cfg.ref_model``."""

    def save_state(self, directory: str) -> None:
        """Trainable weights, optimiser state and RNG, enough for ``load_state`` to resume."""

    def load_state(self, directory: str) -> None: ...

    def save_adapters(self, directory: str) -> None:
        """The artefact a user takes away (MLX adapter dir, PEFT dir, or a full model dir)."""

    def generate(self, prompt: str, max_tokens: int) -> str:
        """Greedy reply to one user message, through the tokenizer's chat template."""

    def sample(self, prompts: list[list[int]], params: Any, seed: int) -> list[Any]:
        """Rollouts: one ``algorithms.rl.sampling.Completion`` per prompt, in order.

        ``prompts`` are token ids (chat template already applied, each repeated as often as
        completions are wanted); ``params`` is a ``SamplingParams``. Batched with a KV cache,
        ``params.batch_size`` sequences at a time (0 = all), left padding masked so a prompt
        samples from the same distribution whatever it is batched with. Filters: temperature,
        top-k, top-p, min-p (transformers' order). A completion ends at an EOS id
        (``stop_token_ids``), a stop string or ``max_tokens``, as ``sampling.finish`` rules.
        The same (prompts, params, seed) gives the same completions on the same backend; the
        training RNG is not disturbed; the model samples in eval mode, adapters active, and its
        train/eval mode is restored afterwards.
        """

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters by name, as numpy (for tests and checkpoints)."""

    def peak_memory_bytes(self) -> int: ...


def attention_allowed(segment_ids: np.ndarray) -> np.ndarray | None:
    """Boolean ``[B, T, T]``: query ``q`` may attend to key ``k`` iff same segment and ``k <= q``.

    Returns None when a plain causal mask is equivalent: every row is one document followed by
    padding (padding sits after the real tokens, so causal attention never lets a real token see
    it, and padded positions carry no loss).
    """
    seg = np.asarray(segment_ids)
    if seg.max(initial=0) <= 1:
        return None
    t = seg.shape[1]
    causal = np.tril(np.ones((t, t), dtype=bool))
    return (seg[:, :, None] == seg[:, None, :]) & causal[None]


def reference_kind(cfg: Any) -> str:
    """Which reference policy a run uses: ``ref_model`` (``cfg.ref_model`` set),
    ``frozen_copy`` (full fine-tuning) or ``adapters_disabled`` (LoRA / DoRA: no second copy)."""
    if getattr(cfg, "ref_model", ""):
        return "ref_model"
    return "frozen_copy" if cfg.fine_tune_type == "full" else "adapters_disabled"


def lora_a_init(seed: int, module_path: str, in_features: int, rank: int) -> np.ndarray:
    """Initial LoRA ``A`` for one module, ``[rank, in_features]`` float32 (PEFT's layout).

    Uniform(-1/sqrt(in), 1/sqrt(in)) from a generator keyed by (seed, module path), so both
    backends start from identical adapters whatever order they visit modules in. ``B`` starts at
    zero, so the adapted model equals the base model at step 0.
    """
    digest = hashlib.sha256(f"{seed}:{module_path}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
