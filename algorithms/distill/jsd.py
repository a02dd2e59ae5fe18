"""The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv 2306.13649),
per token, over the array-ops shim: written once, run by each backend chunk by chunk inside its
head pass (the ``teacher_divergence`` model output), and by the tests on full logits.

With the student's and the teacher's next-token log-probs ``ls = log softmax(z_s / T)``,
``lt = log softmax(z_t / T)`` (the teacher detached) and ``M = beta T + (1 - beta) S``:

    beta = 0      KL(teacher || student)  = sum_v t_v (lt_v - ls_v)       (forward KL)
    beta = 1      KL(student || teacher)  = sum_v s_v (ls_v - lt_v)       (reverse KL)
    otherwise     beta KL(teacher || M) + (1 - beta) KL(student || M),
                  log M = logaddexp(lt + log beta, ls + log(1 - beta))

(the end points are the limits of ``JSD_beta / beta`` and ``JSD_beta / (1 - beta)``, TRL's
convention, not the vanishing ``JSD_0 = JSD_1 = 0``).
"""

from __future__ import annotations

import math
from typing import Any


def log_softmax(ops: Any, z: Any) -> Any:
    return z - ops.logsumexp(z, axis=-1)[:, None]


def generalized_jsd(ops: Any, student_logits: Any, teacher_logits: Any, beta: float) -> Any:
    """``[n]`` divergences from ``[n, V]`` logits already divided by the temperature; the
    gradient flows to the student's logits only."""
    ls = log_softmax(ops, student_logits)
    lt = ops.stop_gradient(log_softmax(ops, teacher_logits))
    if beta == 0:
        return ops.sum(ops.exp(lt) * (lt - ls), axis=-1)
    if beta == 1:
        return ops.sum(ops.exp(ls) * (ls - lt), axis=-1)
    a, b = ls + math.log(1.0 - beta), lt + math.log(beta)
    top = ops.stop_gradient(ops.maximum(a, b))
    lm = top + ops.log(ops.exp(a - top) + ops.exp(b - top))
    return (beta * ops.sum(ops.exp(lt) * (lt - lm), axis=-1)
            + (1.0 - beta) * ops.sum(ops.exp(ls) * (ls - lm), axis=-1))
