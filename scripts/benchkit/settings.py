"""The matched-settings check: two runs are compared only if they trained the same thing.

Each runner reads its settings back from what its tool recorded (our ``config.json``, mlx-lm's
``adapter_config.json``, TRL's trainer args), normalised to one vocabulary (block-relative
target paths, alpha rather than scale, the compute dtype). A comparison whose settings differ
is refused with a message naming every differing setting and both values; no ratio is given.
"""

from __future__ import annotations

import math
from typing import Any

from .measure import Run
from .recipe import MATCHED, matched_keys

LORA_ONLY = ("lora_rank", "lora_alpha", "target_modules")


class SettingsMismatch(ValueError):
    """Two runs were asked to be compared but trained with different settings."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def check_matched(name_a: str, a: dict, name_b: str, b: dict,
                  keys: tuple[str, ...] = MATCHED) -> None:
    """Raise :class:`SettingsMismatch` naming each setting in ``keys`` that differs."""
    if a.get("fine_tune_type") == b.get("fine_tune_type") == "full":
        keys = tuple(k for k in keys if k not in LORA_ONLY)
    bad = []
    for key in keys:
        if key not in a or key not in b:
            missing = name_a if key not in a else name_b
            bad.append(f"{key} (not recorded by {missing})")
        elif not _same(a[key], b[key]):
            bad.append(f"{key} ({name_a}: {a[key]!r}, {name_b}: {b[key]!r})")
    if bad:
        hint = ""
        if any(b.startswith("dtype (") for b in bad):
            hint = (" (mlx-lm trains in the dtype the weights are stored in: pass --dtype to "
                    "match it, or --model-dtype for random:SIZE models)")
        raise SettingsMismatch(f"refusing to compare {name_a} with {name_b}: settings differ: "
                               + "; ".join(bad) + hint)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(ours: Run, baseline: Run) -> dict[str, Any]:
    """Side-by-side ratios (ours / baseline), or a refusal naming the differing settings."""
    out: dict[str, Any] = {"ours": ours.name, "baseline": baseline.name}
    if ours.status != "ok" or baseline.status != "ok":
        failed = ours if ours.status != "ok" else baseline
        return {**out, "status": "n/a", "message": f"{failed.name} {failed.status}"}
    algorithm = ours.settings.get("algorithm", "sft")
    keys = matched_keys(algorithm) + (("algorithm",) if "algorithm" in ours.settings else ())
    try:
        check_matched(ours.name, ours.settings, baseline.name, baseline.settings, keys)
    except SettingsMismatch as e:
        return {**out, "status": "refused", "message": str(e)}
    s, b = ours.summary, baseline.summary
    return {**out, "status": "ok",
            "tokens_per_s_ratio": _ratio(s.get("tokens_per_s"), b.get("tokens_per_s")),
            "tokens_per_cpu_s_ratio": _ratio(s.get("tokens_per_cpu_s"),
                                             b.get("tokens_per_cpu_s")),
            "peak_rss_ratio": _ratio(ours.memory.get("peak_rss"), baseline.memory.get("peak_rss")),
            "mlx_peak_ratio": _ratio(ours.memory.get("mlx_peak"), baseline.memory.get("mlx_peak")),
            "cuda_peak_ratio": _ratio(ours.memory.get("cuda_peak"),
                                      baseline.memory.get("cuda_peak"))}
