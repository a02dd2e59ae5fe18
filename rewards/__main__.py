"""``python -m rewards``: list the available rewards, or score a JSONL file of completions.

    python -m rewards --list-rewards
    python -m rewards score completions.jsonl --reward math_answer --reward my.py:score \\
        --reward-weights 1,0.5 --reward-on-error none --out scores.jsonl

Each line of the file is ``{"prompt": ..., "completion": ..., <any other columns>}``; the other
columns reach the functions by name, exactly as in training. Use it to try a reward plugin on
real completions before spending GPU hours on it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from converters.cli import ArgumentParser

from . import (
    ON_ERROR_CHOICES,
    RewardError,
    RewardScorer,
    format_reward_list,
    load_reward,
    parse_reward_weights,
)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise RewardError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RewardError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "completion" not in row:
            raise RewardError(f"{path}:{number}: each line must be an object with a "
                              f"\"completion\" (and usually a \"prompt\"); got {line[:60]!r}")
        rows.append(row)
    if not rows:
        raise RewardError(f"{path}: holds no rows")
    return rows


def score_file(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise RewardError(f"--timeout {args.timeout!r}: must be a finite number of seconds > 0")
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise RewardError(f"--out {out}: " + ("is a directory" if out.is_dir() else
                                              f"{out.parent} is not a directory"))
    if args.allow_weak_sandbox:
        from .code_exec import allow_weak_sandbox

        allow_weak_sandbox()
    weights = parse_reward_weights(" ".join(args.reward_weights or []) or None, len(args.reward))
    funcs = [load_reward(spec) for spec in args.reward]
    rows = read_rows(Path(args.data))
    names = dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "completion"))
    columns = {k: [row.get(k) for row in rows] for k in names}
    scorer = RewardScorer(funcs, weights, on_error=args.reward_on_error, timeout_s=args.timeout)
    scores = scorer.score([row.get("prompt", "") for row in rows],
                          [row["completion"] for row in rows], None, 0, columns)
    for name, values in {**scores.per_function, "total": scores.total}.items():
        scored = ~np.isnan(values)
        mean = float(np.mean(values[scored])) if scored.any() else float("nan")
        print(f"{name:<32} mean {mean:.4f}  scored {int(scored.sum())}/{len(values)}")
    if args.out:
        from converters.atomic import write_text_atomically

        lines = []
        for i in range(len(rows)):
            record = {n: _none_if_nan(v[i]) for n, v in scores.per_function.items()}
            lines.append(json.dumps({**record, "total": _none_if_nan(scores.total[i])}) + "\n")
        write_text_atomically(args.out, "".join(lines))  # whole, or not at all
    return 0


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rewards", description=__doc__.split("\n")[0])
    parser.add_argument("--list-rewards", action="store_true", help="list every available reward")
    sub = parser.add_subparsers(dest="verb")
    score = sub.add_parser("score", help="score a JSONL file of completions")
    score.add_argument("data", help="JSONL: {prompt, completion, ...columns} per line")
    score.add_argument("--reward", action="append", required=True,
                       help="reward spec (repeatable): built-in, file.py:fn, pkg.mod:fn, entry point")
    score.add_argument("--reward-weights", nargs="+",
                       help="one weight per --reward: 1,0.5 or 1 0.5")
    score.add_argument("--reward-on-error", choices=ON_ERROR_CHOICES, default="raise",
                       help="a raising function stops (raise) or scores None (none)")
    score.add_argument("--timeout", type=float, default=60.0, help="seconds per function call")
    score.add_argument("--out", help="write per-row scores here (JSONL)")
    score.add_argument("--allow-weak-sandbox", action="store_true",
                       help="let code_exec run where no sandboxing tool (bubblewrap, "
                            "sandbox-exec) works, under the weaker in-process guard")
    args = parser.parse_args(argv)
    try:
        if args.list_rewards:
            print(format_reward_list())
            return 0
        if args.verb == "score":
            return score_file(args)
    except (RewardError, OSError) as e:  # OSError: --out could not be written (disk full...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
