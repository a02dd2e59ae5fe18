"""The backend boundary: what the algorithm layer asks of ``mlx_ft`` and ``cuda_ft``.

A backend owns a model (with its adapters and, for PPO, a value head), an optimiser and their
state. The algorithm layer hands it numpy batches and a :class:`Loss`; the backend runs the
model ONCE per micro-batch, computes the outputs the loss declared (and only those), evaluates
the loss, and does the update. Numbers must agree across backends, so the few choices that
affect them (LoRA and value-head init, attention masks, the batch layout) are made here, once,
in numpy. ``docs/ARCHITECTURE.md`` draws the whole picture.

Model outputs (:data:`OUTPUTS`), each ``[B, T]`` float32, position ``t`` scoring ``targets[t]``:

- ``logps``       ``log p(targets[t] | input_ids[:t+1])``, under ``softmax(z / temperature)``.
- ``entropy``     ``H_t = -sum_v p_v log p_v`` of the same next-token distribution.
- ``log_sum_sq``  ``log sum_v p_v^2`` (WPO's per-token normaliser).
- ``values``      ``V_t = w . h_t + b``: the value head on the final hidden state ``h_t`` (PPO).
- ``teacher_divergence``  GKD's generalised Jensen-Shannon divergence between the student's
  and the ``--teacher``'s next-token distributions, both under ``softmax(z / temperature)``,
  ``beta = batch["jsd_beta"]`` (:func:`algorithms.distill.jsd.generalized_jsd`); the teacher
  runs without gradient, chunk by chunk beside the student's head, so neither model's
  ``[B, T, V]`` logits exist.

A :class:`Loss` names the outputs it reads and whether each needs a gradient; everything comes
from one decoder pass and one chunked pass over the vocabulary (the ``[B, T, V]`` logits never
exist). Backends compute nothing a loss did not ask for.

Head rows: a loss that reads the head outputs (``logps``, ``entropy``, ``log_sum_sq``) only
where a ``[B, T]`` batch key is nonzero names that key in ``Loss.positions`` (for ``forward``,
the batch comes from ``with_head_mask(batch, key)``, which adds the private ``_head_mask``):
the backend then runs the vocabulary pass at those positions only and returns 0 elsewhere
(GRPO's prompt tokens, a DPO pair's prompts: about half of their rows).
``values`` and ``teacher_divergence`` are computed at every position. ``positions=None`` (the
default) means every position. ``POSTTRAIN_HEAD_ROWS=0`` turns the selection off everywhere
(to measure it).

Batch keys: one vocabulary for every algorithm (:data:`BATCH_KEYS`). Inputs, ``[B, T]``, from
:mod:`algorithms.data` or :mod:`algorithms.rl.batches`:

- ``input_ids``   int32: tokens fed to the model.
- ``targets``     int32: the token each position predicts (``input_ids`` shifted left by one
  inside each document; the last position of a document holds a pad id and is masked).
- ``loss_mask``   float32: 1 where ``targets`` carries loss.
- ``segment_ids`` int32: document index inside the row, 1-based; 0 marks padding. A token
  attends only to earlier tokens of its own segment, so packed documents are isolated.

Step-level scalars added by the loops: ``num_items`` (loss tokens in the whole optimiser step,
the denominator of token means), ``micro_fraction`` (this micro-batch's share of the step's
rows or tokens), ``temperature`` (online RL: every output of the batch is taken under the
sampling distribution, so the importance ratio is exactly 1 before the first update).

Per-token arrays from earlier no-grad passes, ``[B, T]``: ``old_per_token_logps`` (the
sampling policy), ``ref_per_token_logps`` (the reference policy), ``old_values`` (the value
head at rollout time), and for KTO's mismatched rows ``kl_per_token_logps`` /
``ref_kl_per_token_logps``. Per-row or per-token targets of online RL: ``advantages``
(``[B]`` or ``[B, T]``), ``returns`` and ``entropy_mask`` (``[B, T]``). Unpaired preference
rows carry ``label`` ``[B]`` (1 desirable) and BCO's running reward mean ``bco_reward_mean``;
online pairs ``pair_weight`` ``[B]`` (0: no preference), ``from_second`` ``[2B]`` (the pair's
second completion) and Nash-MD's ``preference`` ``[B]``; distillation the scalar ``jsd_beta``.

Keys starting with ``_`` are a backend's own and never reach a loss.

Several processes (:mod:`algorithms.distributed`): every rank makes the same calls in the same
order; a batch with 0 rows is a rank's empty share (``forward_backward`` / ``evaluate`` return
``{}``, ``forward`` 0-row arrays) and still takes part in the backend's collectives; gradients
are summed over ranks before ``optimizer_step`` clips them; ``save_state`` and
``save_adapters`` are called on every rank, with None on ranks other than 0 (which write
nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

OUTPUTS = ("logps", "entropy", "log_sum_sq", "values", "teacher_divergence")

BATCH_KEYS = (
    "input_ids", "targets", "loss_mask", "segment_ids", "num_items", "micro_fraction",
    "temperature", "old_per_token_logps", "ref_per_token_logps", "old_values",
    "kl_per_token_logps", "ref_kl_per_token_logps", "advantages", "returns", "entropy_mask",
    "label", "bco_reward_mean", "pair_weight", "from_second", "preference", "jsd_beta",
)

# The value head's file beside the adapters (both backends, and what the converters carry):
# safetensors with ``v_head.weight`` float32 [1, hidden] and ``v_head.bias`` float32 [1].
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_KEYS = ("v_head.weight", "v_head.bias")

# Linear layers of a transformer block adapted by default (llama / qwen / mistral / gemma / phi3
# names). Backends adapt every linear layer inside the blocks; this list only documents them.
COMMON_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "qkv_proj", "gate_up_proj", "dense", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss and the model outputs it reads.

    ``fn(ops, outputs, batch) -> (scalar loss, {name: scalar metric})`` with ``outputs`` a dict
    of the requested :data:`OUTPUTS` (``[B, T]`` arrays of the backend's framework);
    ``outputs`` maps each name to whether the loss differentiates through it. ``positions``
    names the ``[B, T]`` batch key outside of whose nonzero entries ``fn`` never reads a head
    output (see "Head rows" above), or is None: every position.
    """

    fn: Callable[[Any, dict, dict], tuple[Any, dict]]
    outputs: Mapping[str, bool] = dataclasses.field(default_factory=lambda: {"logps": True})
    positions: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown model outputs {sorted(unknown)}; known: {OUTPUTS}")

    def __call__(self, ops: Any, outputs: Any, batch: dict) -> tuple[Any, dict]:
        """``outputs`` is the dict of model outputs, or the per-token log-probs alone (then
        they are the ``logps`` output: how tests call a loss on hand-made log-probs)."""
        if not isinstance(outputs, Mapping):
            outputs = {"logps": outputs}
        return self.fn(ops, outputs, batch)

    def scaled(self, key: str) -> Loss:
        """This loss times ``batch[key]`` (e.g. ``micro_fraction``: a mean over the sequences
        or pairs of a micro-batch, scaled by its share, sums to the step's mean)."""

        def fn(ops: Any, outputs: dict, batch: dict) -> tuple[Any, dict]:
            value, metrics = self.fn(ops, outputs, batch)
            return value * batch[key], metrics

        return Loss(fn, self.outputs, self.positions)


def logps_loss(fn: Callable[[Any, Any, dict], tuple[Any, dict]],
               positions: str | None = None) -> Loss:
    """A :class:`Loss` from ``fn(ops, per_token_logps, batch)``: the common case, log-probs with
    gradient and nothing else."""
    return Loss(lambda ops, outputs, batch: fn(ops, outputs["logps"], batch), {"logps": True},
                positions)


def as_loss(loss: Loss | Callable) -> Loss:
    """``loss`` itself, or a plain ``(ops, per_token_logps, batch)`` function as a Loss."""
    return loss if isinstance(loss, Loss) else logps_loss(loss)


def loss_view(batch: dict) -> dict:
    """The batch as a loss sees it: backend-private ``_`` keys removed."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class Backend(Protocol):
    """What the training loops need from a backend (``mlx_ft.MLXBackend``,
    ``cuda_ft.TorchBackend``); ``tests/test_backend_conformance.py`` holds every property."""

    name: str
    ops: Any          # the array-ops shim (algorithms.ops.ArrayOps)
    tokenizer: Any    # a Hugging Face tokenizer (the same on every backend)

    def forward_backward(self, batch: dict[str, np.ndarray], loss: Loss) -> dict[str, float]:
        """One pass computing ``loss.outputs``, the loss and its gradients; gradients are
        summed until ``optimizer_step``. Adapter dropout is on."""

    def evaluate(self, batch: dict[str, np.ndarray], loss: Loss) -> dict[str, float]:
        """The loss and its metrics of one micro-batch without gradients or dropout."""

    def forward(self, batch: dict[str, np.ndarray], outputs: Iterable[str],
                reference: bool = False) -> dict[str, np.ndarray]:
        """The named outputs, float32 ``[B, T]`` numpy, without gradients or dropout, under the
        policy or (``reference=True``) the reference policy: the base model with adapters
        disabled (LoRA/DoRA, no second copy; with ``--init-adapter`` the frozen initial
        adapter stays on), a frozen copy of the start (full), or ``cfg.reference_model``. The
        reference has no value head. A batch from ``with_head_mask(batch, key)`` gets the
        head outputs at the positions where ``batch[key]`` is nonzero only (0 elsewhere)."""

    def optimizer_step(self, learning_rate: float, max_grad_norm: float) -> float:
        """Clip the summed gradients by global norm, apply AdamW, zero them; returns the norm."""

    def save_state(self, directory: str | None) -> None:
        """Trainable weights (value head included), optimiser state and RNG: enough for
        ``load_state`` to resume bit for bit (whole tensors, whatever the sharding; None: a
        rank other than 0, which only takes part)."""

    def load_state(self, directory: str) -> None: ...

    def save_adapters(self, directory: str | None) -> None:
        """The artefact a user takes away (MLX adapter dir, PEFT dir, or a full model dir),
        plus :data:`VALUE_HEAD_FILE` when the run has a value head (None: as ``save_state``)."""

    def load_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Adapter weights under canonical names (``algorithms.adapter_io``, read from an
        mlx-lm or PEFT dir) into the adapter layers (``evaluate`` / ``generate --adapter``)."""

    def generate(self, prompt: str, max_tokens: int) -> str:
        """Greedy reply to one user message, through the tokenizer's chat template."""

    def sample(self, prompts: list[list[int]], params: Any, seed: int | list[int]) -> list[Any]:
        """Rollouts: one ``algorithms.rl.sampling.Completion`` per prompt, in order.

        ``prompts`` are token ids (chat template already applied, each repeated as often as
        completions are wanted); ``params`` is a ``SamplingParams``. Batched with a KV cache,
        ``params.batch_size`` sequences at a time (0 = all), left padding masked so a prompt
        samples from the same distribution whatever it is batched with. Filters: temperature,
        top-k, top-p, min-p (transformers' order). A completion ends at an EOS id
        (``stop_token_ids``), a stop string or ``max_tokens``, as ``sampling.finish`` rules.
        The same (prompts, params, seed) gives the same completions on the same backend; with
        one seed per prompt, each completion depends on its prompt and seed alone (not on the
        other prompts, the batching, or the rank that samples it); the training RNG is not
        disturbed; the model samples in eval mode and its train/eval mode is restored
        afterwards.

        ``params.source`` picks the sampling distribution: ``policy`` (adapters active),
        ``reference`` (what ``forward(reference=True)`` runs: XPO's second completion),
        ``mixture`` (Nash-MD's geometric mixture: next-token log-probs
        ``(1 - c) log pi + c log ref``, ``c = params.mixture_coef``, renormalised, then the
        filters; each model keeps its own KV cache), ``teacher`` (the ``--teacher`` model of a
        distillation run).
        """

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters by canonical name (PEFT's layout; ``v_head.*``), as numpy."""

    def peak_memory_bytes(self) -> int: ...


class ForwardShortcuts:
    """``per_token_logps`` / ``reference_per_token_logps``: the most used ``forward`` calls,
    written once for both backends."""

    def per_token_logps(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.forward(batch, ("logps",))["logps"]

    def reference_per_token_logps(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.forward(batch, ("logps",), reference=True)["logps"]


HEAD_MASK = "_head_mask"  # the private batch key carrying the positions the head runs at


def with_head_mask(batch: dict, positions: str | None) -> dict:
    """``batch`` plus the private ``_head_mask`` (bool ``[B, T]``: ``batch[positions] != 0``)
    that tells a backend where the head outputs are read (a loss's ``positions``, or what a
    caller of ``forward`` will read); ``batch`` itself for None (or ``POSTTRAIN_HEAD_ROWS=0``)."""
    if positions is None or os.environ.get("POSTTRAIN_HEAD_ROWS", "1") == "0":
        return batch
    if positions not in batch:
        raise KeyError(f"positions={positions!r} is not a key of the batch "
                       f"({', '.join(sorted(batch))})")
    return {**batch, HEAD_MASK: np.asarray(batch[positions]) != 0}


def head_rows(flat_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(keep, inverse)`` for the head pass over ``N`` flat positions: ``keep`` the positions
    to run it at (int64, at least one), ``inverse [N]`` each position's index in ``keep`` or
    ``len(keep)`` (where a backend appends one 0), so ``concat(out, [0])[inverse]`` is the full
    ``[N]`` output; None when every position is kept (or no mask is given)."""
    if flat_mask is None:
        return None
    flat_mask = np.asarray(flat_mask).reshape(-1)
    keep = np.flatnonzero(flat_mask)
    if len(keep) == len(flat_mask):
        return None
    if len(keep) == 0:  # nothing read: one position keeps every shape non-empty
        keep = np.zeros(1, np.int64)
    inverse = np.full(len(flat_mask), len(keep), np.int64)
    inverse[keep] = np.arange(len(keep))
    if not flat_mask[keep[0]]:  # the stand-in position is still read as 0
        inverse[keep[0]] = len(keep)
    return keep.astype(np.int64), inverse


def check_outputs(outputs: Iterable[str], has_value_head: bool,
                  has_teacher: bool = False) -> tuple[str, ...]:
    """``outputs`` as a tuple, refusing unknown names, ``values`` without a value head and
    ``teacher_divergence`` without a teacher."""
    wanted = tuple(dict.fromkeys(outputs))
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown model outputs {unknown}; known: {', '.join(OUTPUTS)}")
    if "values" in wanted and not has_value_head:
        raise ValueError("'values' asked of a model without a value head (only runs whose "
                         "advantage estimator is gae have one)")
    if "teacher_divergence" in wanted and not has_teacher:
        raise ValueError("'teacher_divergence' asked of a run without a teacher (--teacher)")
    return wanted


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
    """Which reference policy a run uses: ``ref_model`` (``cfg.reference_model`` set),
    ``frozen_copy`` (full fine-tuning) or ``adapters_disabled`` (LoRA / DoRA: no second copy)."""
    if cfg.reference_model:
        return "ref_model"
    return "frozen_copy" if cfg.fine_tune_type == "full" else "adapters_disabled"


def save_value_head(directory: str | Path, weights: dict[str, np.ndarray]) -> Path:
    """Write :data:`VALUE_HEAD_FILE` (float32 ``v_head.weight`` [1, H], ``v_head.bias`` [1])."""
    from safetensors.numpy import save_file

    missing = [k for k in VALUE_HEAD_KEYS if k not in weights]
    if missing:
        raise ValueError(f"value head weights lack {missing}")
    path = Path(directory) / VALUE_HEAD_FILE
    save_file({k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in VALUE_HEAD_KEYS},
              str(path), metadata={"format": "posttrain-value-head"})
    return path


def load_value_head(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The value head saved beside an adapter, or None when there is none; an error naming
    the file when it is not one."""
    from safetensors.numpy import load_file

    path = Path(directory) / VALUE_HEAD_FILE
    if not path.is_file():
        return None
    try:
        weights = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if set(weights) != set(VALUE_HEAD_KEYS) or weights["v_head.weight"].ndim != 2 \
            or weights["v_head.weight"].shape[0] != 1 or weights["v_head.bias"].shape != (1,):
        raise ValueError(f"{path}: not a value head (want v_head.weight [1, H] and "
                         f"v_head.bias [1]; got {({k: v.shape for k, v in weights.items()})})")
    return weights


def _keyed_rng(*key: Any) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def lora_a_init(seed: int, module_path: str, in_features: int, rank: int) -> np.ndarray:
    """Initial LoRA ``A`` for one module, ``[rank, in_features]`` float32 (PEFT's layout).

    Uniform(-1/sqrt(in), 1/sqrt(in)) from a generator keyed by (seed, module path), so both
    backends start from identical adapters whatever order they visit modules in. ``B`` starts at
    zero, so the adapted model equals the base model at step 0.
    """
    bound = 1.0 / np.sqrt(in_features)
    return _keyed_rng(seed, module_path).uniform(
        -bound, bound, size=(rank, in_features)).astype(np.float32)


def value_head_init(seed: int, hidden_size: int) -> dict[str, np.ndarray]:
    """The value head ``V(h) = w . h + b`` at step 0: ``w ~ Normal(0, 1 / hidden_size)``
    (std ``1/sqrt(hidden)``, scaled by 1/sqrt(hidden) again), ``b = 0``.

    The final hidden states of a normed decoder have entries of order 1, so ``w . h`` starts
    with a spread of ``~ 1/sqrt(hidden)``: values start near 0, the return of a reward in
    [-1, 1] is reachable within a few clipped updates (``--cliprange-value``), and GAE's first
    advantages are the rewards themselves rather than noise. Keyed by the run's seed, so both
    backends start from the same head.
    """
    std = 1.0 / hidden_size
    weight = _keyed_rng(seed, "v_head").normal(0.0, std, size=(1, hidden_size))
    return {"v_head.weight": weight.astype(np.float32), "v_head.bias": np.zeros(1, np.float32)}


def checkpointed_blocks(cfg: Any, num_blocks: int) -> list[int]:
    """The transformer blocks to checkpoint (``--grad-checkpoint`` / ``--grad-checkpoint-blocks``),
    the same on both backends: none, all, or ``n`` spread evenly (block ``floor(i L / n)`` for
    ``i < n``). Raises ValueError naming the flag when ``n`` exceeds the model's blocks."""
    count = int(getattr(cfg, "grad_checkpoint_blocks", 0) or 0)
    if count > num_blocks:
        raise ValueError(f"--grad-checkpoint-blocks {count}: the model has {num_blocks} "
                         "transformer blocks")
    if count == 0:
        return list(range(num_blocks)) if getattr(cfg, "grad_checkpoint", False) else []
    return [i * num_blocks // count for i in range(count)]
