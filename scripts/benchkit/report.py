"""Benchmark outputs: ``results.json`` (schema-checked before it is written) and ``results.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .measure import TIME_SPLIT

_NUM = {"type": ["number", "null"]}
_RUN = {
    "type": "object",
    "required": ["name", "runner", "framework", "device", "status", "settings", "steps",
                 "memory", "summary", "command"],
    "properties": {
        "name": {"type": "string"}, "runner": {"enum": ["ours", "mlx-lm", "trl", "trl-liger"]},
        "framework": {"enum": ["mlx", "torch"]}, "device": {"enum": ["cpu", "gpu"]},
        "status": {"enum": ["ok", "failed", "skipped"]}, "message": {"type": "string"},
        "settings": {"type": "object"}, "memory": {"type": "object",
                                                 "additionalProperties": {"type": "number"}},
        "steps": {"type": "array", "items": {
            "type": "object", "required": ["step", "loss", "step_time", "tokens"],
            "properties": {"step": {"type": "integer"}, "loss": {"type": "number"},
                           "step_time": _NUM, "tokens": {"type": "number"}}}},
        "summary": {"type": "object"}, "command": {"type": "array", "items": {"type": "string"}},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["schema_version", "recipe", "machine", "runs", "comparisons", "parity"],
    "properties": {
        "schema_version": {"const": 1},
        "recipe": {"type": "object", "required": ["model", "algorithm", "data", "steps"]},
        "machine": {"type": "object", "required": ["cpu", "cores", "versions", "git_commit"]},
        "runs": {"type": "array", "items": _RUN},
        "comparisons": {"type": "array", "items": {
            "type": "object", "required": ["ours", "baseline", "status"],
            "properties": {"status": {"enum": ["ok", "refused", "n/a"]}}}},
        "parity": {"type": "object", "required": ["verdict"],
                   "properties": {"verdict": {"enum": ["agree", "disagree", "n/a"]}}},
    },
}


def write_json(results: dict[str, Any], path: Path) -> None:
    import jsonschema

    jsonschema.validate(results, SCHEMA)
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def split_cell(split: dict | None) -> str:
    """``gen 10.9, score 0.0, logps 6.4, update 7.9``: the phases a run logged, in step order."""
    if not split:
        return "-"
    return ", ".join(f"{k.split('/', 1)[1].replace('forward_backward', 'fwd+bwd')} "
                     f"{split[k]:.2f}" for k in TIME_SPLIT if k in split)


def run_rows(runs: list[dict]) -> list[str]:
    header = ("| run | status | tokens/s | tokens/CPU-s | step time s: median (p25-p75) | "
              "peak RSS GB | MLX / CUDA peak GB | final loss | time split s/step | "
              "load start-end |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, m = r["summary"], r["memory"]
        st = s.get("step_time") or {}
        step = (f"{st['median']:.2f} ({st['p25']:.2f}-{st['p75']:.2f})" if st else "-")
        device_peak = m.get("mlx_peak", m.get("cuda_peak"))
        split_text = split_cell(s.get("time_split"))
        if s.get("completion_length"):
            split_text += f" (completions {s['completion_length']:.1f} tokens)"
        load = "-".join(f"{x:.1f}" for x in r.get("load_avg") or []) or "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: " \
            f"{r.get('message', '').splitlines()[0] if r.get('message') else ''}"
        rows.append(f"| {r['name']} | {status} | {_f(s.get('tokens_per_s'))} | "
                    f"{_f(s.get('tokens_per_cpu_s'))} | {step} | {_f(m.get('peak_rss'), '{:.2f}')} | "
                    f"{_f(device_peak, '{:.2f}')} | {_f(s.get('final_loss'), '{:.4f}')} | "
                    f"{split_text} | {load} |")
    return rows


def comparison_rows(comparisons: list[dict]) -> list[str]:
    if not comparisons:
        return []
    header = ("| ours | baseline | tokens/s ratio | tokens/CPU-s ratio | peak RSS ratio | "
              "MLX / CUDA peak ratio |")
    rows = ["", "## Side by side (ours / baseline, same invocation)", "", header,
            "|---|---|---|---|---|---|"]
    for c in comparisons:
        if c["status"] != "ok":
            rows.append(f"| {c['ours']} | {c['baseline']} | {c['status']}: "
                        f"{c.get('message', '')} | | | |")
            continue
        peak = c.get("mlx_peak_ratio") or c.get("cuda_peak_ratio")
        rows.append(f"| {c['ours']} | {c['baseline']} | {_f(c['tokens_per_s_ratio'], '{:.2f}x')} "
                    f"| {_f(c['tokens_per_cpu_s_ratio'], '{:.2f}x')} | "
                    f"{_f(c['peak_rss_ratio'], '{:.2f}x')} | {_f(peak, '{:.2f}x')} |")
    return rows


def markdown(results: dict[str, Any]) -> str:
    recipe, machine = results["recipe"], results["machine"]
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    setup = (f"{recipe['fine_tune_type']} (rank {recipe['lora_rank']}, alpha "
             f"{recipe['lora_alpha']}, targets "
             f"{' '.join(recipe['target_modules']) or 'every block linear'}), batch "
             f"{recipe['batch_size']}, max length {recipe['max_length']}, {recipe['steps']} steps "
             f"(first {recipe['warmup']} left out of timings), lr {recipe['learning_rate']}, "
             f"data {recipe['data']}.")
    where = (f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine.get('memory_gb')} "
             f"GB, {gpus}; {machine['system']} {machine['machine']}; commit "
             f"{(machine.get('git_commit') or 'unknown')[:12]}.  ")
    note = ("Tokens are real (non-padding) tokens. tokens/CPU-s divides by the process CPU "
            "time of the same steps (less distorted by other load than wall time); load is the "
            "machine's 1-minute load average when the run started and ended.")
    lines = [
        f"# Benchmark: {recipe['algorithm']} on {recipe['model']}",
        "", setup, "", where, f"Versions: {versions}.", "", note, "",
        *run_rows(results["runs"]),
        *comparison_rows(results["comparisons"]),
        "",
        "## Parity",
        "",
        f"{results['parity']['verdict']}: {results['parity'].get('message', '')}",
    ]
    for variant, group in results["parity"].get("groups", {}).items():
        for name, pair in group["pairs"].items():
            lines.append(f"- {variant}: {name} vs {group['reference']}: max |diff| "
                         f"{_f(pair['max_abs_diff'], '{:.2e}')} over {pair['steps']} steps "
                         f"({'agree' if pair['agree'] else 'DISAGREE'})")
    charts = results.get("charts") or []
    if charts:
        lines += ["", *[f"![{Path(c).stem}]({Path(c).name})" for c in charts]]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.write_text(markdown(results))
