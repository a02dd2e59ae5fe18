"""BCO: binary classifier optimisation on unpaired completions (Jung et al. 2024, arXiv
2404.04656), and the running reward mean ``delta`` it shares with DPO's ``bco_pair``.

Rows are single completions with ``batch["label"]`` 1 (desirable) or 0 (undesirable), as KTO's
(paired data is unpaired). The implicit reward is ``r = beta (log pi(y|x) - log ref(y|x))``
(masked sums); the classifier's logit is ``r - delta``:

    desirable:    -log sigma(r - delta)
    undesirable:  -log sigma(-(r - delta))

``L`` = the mean over the rows (scaled by the micro-batch's share of the step). ``delta`` is the
running mean of every reward seen so far, ``batch["bco_reward_mean"]``: the loop's prepare hook
(:func:`running_delta`) evaluates the step's rewards under the current policy (one no-grad pass),
folds them into :class:`RunningMean` (a count-weighted mean over all rewards of all steps,
this step included: what TRL's ``RunningMoments`` holds after its update), and hands the new
mean to every micro-batch of the step, so gradient accumulation changes nothing. Evaluation
reads ``delta`` without updating it. The state is saved in every checkpoint and restored on
resume (the spine's algorithm state).

TRL updates delta once per micro-batch (with gradient accumulation its delta moves inside a
step); TRL's optional underlying-distribution matching (a prompt classifier on embeddings) is
not implemented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..backend import Loss, logps_loss
from ..config import field
from .common import check_beta, pair_share, sequence_logps
from .config import ReferenceConfig

DELTA_KEY = "bco_reward_mean"
REWARD_METRIC = "bco/batch_reward_mean"


class RunningMean:
    """The mean of every value folded in so far (count-weighted), as a checkpointable state."""

    def __init__(self) -> None:
        self.mean, self.count = 0.0, 0

    def update(self, mean: float, count: int) -> None:
        """Fold in ``count`` values whose mean is ``mean``."""
        if count <= 0:
            return
        total = self.count + count
        self.mean += (float(mean) - self.mean) * count / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"bco_delta_mean": self.mean, "bco_delta_count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if "bco_delta_mean" not in state:
            raise ValueError("the checkpoint holds no BCO running mean (bco_delta_mean)")
        self.mean, self.count = float(state["bco_delta_mean"]), int(state["bco_delta_count"])


def bco_loss(ops: Any, per_token_logps: Any, batch: dict, beta: float) -> tuple[Any, dict]:
    """Mean over rows of the unpaired BCO loss; see the module docstring."""
    mask, label = batch["loss_mask"], batch["label"]
    logps = sequence_logps(ops, per_token_logps, mask)
    ref = sequence_logps(ops, ops.stop_gradient(batch["ref_per_token_logps"]), mask)
    r = beta * (logps - ref)
    delta = batch.get(DELTA_KEY, 0.0)
    desirable = -ops.log_sigmoid(r - delta)
    undesirable = -ops.log_sigmoid(-(r - delta))
    loss = ops.mean(label * desirable + (1.0 - label) * undesirable)

    sg = ops.stop_gradient
    n_good = ops.maximum(ops.sum(label), 1.0)
    n_bad = ops.maximum(ops.sum(1.0 - label), 1.0)
    chosen = ops.sum(sg(r) * label) / n_good
    rejected = ops.sum(sg(r) * (1.0 - label)) / n_bad
    metrics = {
        "loss/bco": sg(loss),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "logps/chosen": ops.sum(sg(logps) * label) / n_good,
        "logps/rejected": ops.sum(sg(logps) * (1.0 - label)) / n_bad,
        REWARD_METRIC: ops.mean(sg(r)),
        "bco/delta": ops.mean(0.0 * sg(r) + delta),
    }
    return loss * pair_share(batch), metrics


@dataclasses.dataclass
class BCOConfig(ReferenceConfig):
    """Binary Classifier Optimization on prompt / completion / label data (unpaired; paired
    data is unpaired): desirable completions classified above the running mean reward, the
    others below."""

    beta: float = field(0.1, "reward scale beta: r = beta (log pi - log ref)")

    def validate(self) -> None:
        super().validate()
        check_beta(self)


def make_loss(cfg: BCOConfig) -> Loss:
    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        return bco_loss(ops, per_token_logps, batch, cfg.beta)

    return logps_loss(loss, positions="loss_mask")  # the responses only


def running_delta(make_prepare: Callable, loss: Loss) -> Callable:
    """Wrap ``make_prepare``'s hook (reference log-probs...): then fold the step's rewards (the
    loss's ``bco/batch_reward_mean`` metric, evaluated without gradient on each micro-batch and
    weighted by its rows) into a :class:`RunningMean` and hand its mean to every micro-batch as
    ``batch["bco_reward_mean"]``. Batches of another plan (validation) read it unchanged. The
    hook carries the state as ``.state`` (checkpointed by the spine). Across processes each
    micro-batch's reward sum and rows are summed over ranks first, so every rank folds the same
    global values."""
    running = RunningMean()

    def make(cfg: Any, backend: Any, data: Any, model_path: Path) -> Callable:
        inner = make_prepare(cfg, backend, data, model_path)

        def prepare(backend: Any, arrays: list[dict], batches: list, plan: Any) -> None:
            if inner is not None:
                inner(backend, arrays, batches, plan)
            if plan is data.train:
                world = distributed.current()
                for a in arrays:  # every rank evaluates its share (maybe empty: {}) in lockstep
                    rows = len(a["input_ids"])
                    reward = backend.evaluate(a, loss).get(REWARD_METRIC, 0.0)
                    if world.size > 1:  # the micro-batch's rows over every rank
                        total, rows = world.all_sum([reward * rows, rows])
                        reward, rows = (float(total / rows) if rows else 0.0), int(rows)
                    running.update(reward, rows)
            for a in arrays:
                a[DELTA_KEY] = np.float32(running.mean)

        prepare.state = running
        return prepare

    return make


def bco_prepare(cfg: Any, backend: Any, data: Any, model_path: Path) -> Callable:
    """``make_prepare`` of BCO: reference log-probs, then the running delta."""
    from ..offline import reference_prepare

    return running_delta(reference_prepare, make_loss(cfg))(cfg, backend, data, model_path)


def dpo_prepare(cfg: Any, backend: Any, data: Any, model_path: Path) -> Callable | None:
    """``make_prepare`` of DPO: reference log-probs; with ``--bco-running-delta`` (bco_pair)
    also BCO's running delta."""
    from ..offline import reference_prepare
    from .dpo import make_loss as dpo_make_loss

    if not getattr(cfg, "bco_running_delta", False):
        return reference_prepare(cfg, backend, data, model_path)
    return running_delta(reference_prepare, dpo_make_loss(cfg))(cfg, backend, data, model_path)
