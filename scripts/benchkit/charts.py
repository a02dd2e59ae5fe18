"""PNG charts: throughput per run, peak memory per run (by kind), loss curves overlaid.

matplotlib with the non-interactive Agg backend; imported only when charts are drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"ours": "#1f77b4", "mlx-lm": "#ff7f0e", "trl": "#2ca02c", "trl-liger": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(runs: list[dict], path: Path) -> Path:
    plt = _plt()
    ok = [r for r in runs if r["status"] == "ok" and r["summary"].get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(ok) + 2), 4))
    names = [r["name"] for r in ok]
    values = [r["summary"]["tokens_per_s"] for r in ok]
    bars = ax.bar(names, values, color=[COLOURS.get(r["runner"], "grey") for r in ok])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("tokens / s (real tokens, after warm-up)")
    ax.set_title("Training throughput")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_chart(runs: list[dict], path: Path) -> Path:
    plt = _plt()
    ok = [r for r in runs if r["status"] == "ok"]
    kinds = [k for k in ("peak_rss", "mlx_peak", "cuda_peak")
             if any(k in r["memory"] for r in ok)]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(ok) + 2), 4))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j in range(len(ok))]
        bars = ax.bar(xs, [r["memory"].get(kind, 0.0) for r in ok], width, label=kind)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(ok))],
                  [r["name"] for r in ok], rotation=20)
    ax.set_ylabel("GB")
    ax.set_title("Peak memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_chart(runs: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"ours": "-", "mlx-lm": "--", "trl": ":", "trl-liger": "-."}
    for r in runs:
        if r["status"] == "ok" and r["steps"]:
            ax.plot([s["step"] for s in r["steps"]], [s["loss"] for s in r["steps"]],
                    styles.get(r["runner"], "-"), marker="o", markersize=2, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss curves (mlx-lm / TRL batch their data their own way)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(results: dict[str, Any], out: Path) -> list[str]:
    runs = results["runs"]
    return [str(throughput_chart(runs, out / "throughput.png")),
            str(memory_chart(runs, out / "memory.png")),
            str(loss_chart(runs, out / "loss.png"))]
