"""The parity verdict: do the loss curves of our backends agree within the stated tolerance?

Only runs that see the same batches in the same order are comparable step by step: our backends
with the same variant (the data order is a function of the seed; ``--packing`` changes the
batches, so each variant is its own group). mlx-lm and TRL order and batch their data their own
way, so their curves are drawn but never judged. Within a group the first run is the
reference; the curves agree when every common step satisfies
``|loss - loss_ref| <= atol + rtol * |loss_ref|``.
"""

from __future__ import annotations

from typing import Any

# Default absolute tolerance per compute dtype: float32 paths agree to ~1e-4 after tens of
# steps; bfloat16 rounding alone moves a loss by ~1e-2.
DEFAULT_ATOL = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 5e-2}


def curve_verdict(reference: list[float], other: list[float], atol: float,
                  rtol: float = 0.0) -> dict[str, Any]:
    n = min(len(reference), len(other))
    if n == 0:
        return {"agree": False, "steps": 0, "max_abs_diff": None,
                "message": "no common steps"}
    diffs = [abs(a - b) for a, b in zip(reference[:n], other[:n])]
    worst = max(range(n), key=lambda i: diffs[i] - (atol + rtol * abs(reference[i])))
    agree = all(d <= atol + rtol * abs(r) for d, r in zip(diffs, reference))
    if len(reference) != len(other):
        agree = False
    return {"agree": agree, "steps": n, "max_abs_diff": max(diffs),
            "worst_step": worst + 1, "lengths": [len(reference), len(other)]}


def parity(groups: dict[str, dict[str, list[float]]], atol: float,
           rtol: float = 0.0) -> dict[str, Any]:
    """``groups``: {variant: {run name: loss curve}} -> verdict per group and overall."""
    out: dict[str, Any] = {"atol": atol, "rtol": rtol, "groups": {}}
    judged = []
    for variant, curves in groups.items():
        names = list(curves)
        if len(names) < 2:
            continue
        ref = names[0]
        pairs = {name: curve_verdict(curves[ref], curves[name], atol, rtol)
                 for name in names[1:]}
        ok = all(p["agree"] for p in pairs.values())
        judged.append(ok)
        out["groups"][variant or "default"] = {"reference": ref, "agree": ok, "pairs": pairs}
    if not judged:
        out["verdict"] = "n/a"
        out["message"] = "fewer than two of our backends ran the same variant"
    else:
        out["verdict"] = "agree" if all(judged) else "disagree"
        out["message"] = (f"loss curves {'agree' if all(judged) else 'DISAGREE'} within "
                          f"|diff| <= {atol:g} + {rtol:g}*|loss|")
    return out
