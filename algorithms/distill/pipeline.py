"""The online loop's pipeline for GKD (:func:`algorithms.rl.trainer.train` runs it).

Each step draws its data source from (seed, step): the student's samples with probability
``lmbda``, else the teacher's (``seq_kd``) or the data set's completions. The rows are prompt +
completion with the loss on the completion tokens (EOS included), at the divergence's
temperature; micro-batches carry ``jsd_beta`` and their share of the step's TOKENS (the loss is
a token mean over the step). Logged per step: ``gkd/student_completions`` /
``gkd/teacher_completions`` (1 or 0: their means over a log window are the shares), completion
lengths; the loss's ``divergence``. Evaluation: the divergence on the validation set's own
completions (or, for prompts alone, on student samples drawn with a fixed seed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..rl.batches import RolloutBatch
from ..rl.rollouts import (
    Rollouts,
    gather_share,
    reward_view,
    round_seed,
    row_seeds,
    sampling_params,
)
from ..rl.sampling import Completion
from .loss import make_loss

SOURCES = ("student", "teacher", "data")


def step_source(cfg: Any, step: int) -> str:
    """Where step ``step``'s completions come from: a draw from (seed, step), so a resumed run
    draws what an uninterrupted one would."""
    if np.random.default_rng([cfg.seed, step, 0x6B64]).random() < cfg.lmbda:
        return "student"
    return "teacher" if cfg.seq_kd else "data"


class DistillBatch(RolloutBatch):
    """Rollout rows whose micro-batches carry ``jsd_beta`` and a token share of the step."""

    def __init__(self, rollouts: Rollouts, cfg: Any, pad_id: int, source: str):
        super().__init__(rollouts, False, cfg.distill_temperature, pad_id)
        self.beta, self.source = cfg.beta, source

    def micro_batches(self, rows: list[int], batch_size: int, world: Any = None) -> list:
        out = super().micro_batches(rows, batch_size, world)
        tokens = max(1.0, float(sum(sum(self.sequences[i].loss_mask) for i in rows)))
        for _, arrays in out:
            arrays["jsd_beta"] = np.float32(self.beta)
            arrays["micro_fraction"] = np.float32(arrays["loss_mask"].sum() / tokens)
        return out


def completions_for(cfg: Any, backend: Any, examples: list, source: str,
                    seed: int | list[int]) -> list[Completion]:
    """Each example's completion from ``source`` (sampled with ``seed``, one for the call or one
    per example; or the data's own)."""
    if source == "data":
        decode = backend.tokenizer.decode
        return [Completion(list(e.completion_ids), decode(e.completion_ids,
                                                          skip_special_tokens=True),
                           "length" if e.completion_truncated else "eos") for e in examples]
    params = sampling_params(cfg)
    if source == "teacher":
        params = dataclasses.replace(params, source="teacher")
    return backend.sample([e.prompt_ids for e in examples], params, seed)


def _sharded_completions(cfg: Any, backend: Any, examples: list, source: str,
                         step: int) -> tuple[list[Completion], float]:
    """The step's completions, each sampled with its own seed: distributed, each rank samples
    its share of the prompts and the completions are gathered in rank order (the data's own
    completions are read by every rank). Also the slowest rank's seconds."""
    if source == "data":
        start = time.perf_counter()
        return completions_for(cfg, backend, examples, source, 0), time.perf_counter() - start
    mine = distributed.shard(len(examples))
    seeds = row_seeds(round_seed(cfg.seed, step, 0), len(examples))[mine.start:mine.stop]
    start = time.perf_counter()
    own = completions_for(cfg, backend, examples[mine.start:mine.stop], source, seeds) \
        if mine else []
    completions, _, _, seconds = gather_share(own, {}, np.zeros(len(own)),
                                              time.perf_counter() - start)
    return completions, seconds


def _rollouts(examples: list, completions: list[Completion], stats: dict) -> Rollouts:
    n = len(completions)
    return Rollouts(examples, completions, {}, {}, np.full(n, np.nan), stats)


class DistillPipeline:
    """See the module docstring."""

    def scorer(self, cfg: Any, data: Any, backend: Any) -> None:
        return None

    def rollout(self, cfg: Any, backend: Any, stream: Any, scorer: Any, step: int,
                pad_id: int) -> tuple[DistillBatch, dict[str, float]]:
        examples = stream.take(cfg.prompts_per_step)
        source = step_source(cfg, step)
        completions, seconds = _sharded_completions(cfg, backend, examples, source, step)
        lengths = np.array([len(c.ids) for c in completions], dtype=np.float64)
        stats = {"gkd/student_completions": float(source == "student"),
                 "gkd/teacher_completions": float(source == "teacher"),
                 "completions/mean_length": float(lengths.mean()),
                 "completions/max_length": float(lengths.max()),
                 "completions/clipped_ratio": float(np.mean([c.truncated for c in completions])),
                 "time/generation": seconds}
        batch = DistillBatch(_rollouts(examples, completions, stats), cfg, pad_id, source)
        return batch, stats

    def write_samples(self, cfg: Any, run_dir: Path, step: int, batch: DistillBatch,
                      n: int = 2) -> None:
        rollouts = batch.rollouts
        lines = [json.dumps({"step": step, "source": example.source, "prompt": example.prompt,
                             "completion": reward_view(example, completion),
                             "sampled_from": batch.source,
                             "finish_reason": completion.finish_reason}, ensure_ascii=False)
                 + "\n" for example, completion in
                 list(zip(rollouts.examples, rollouts.completions))[:n]]
        with open(Path(run_dir) / "completions.jsonl", "a") as handle:
            handle.writelines(lines)

    def evaluate(self, cfg: Any, backend: Any, dataset: Any, scorer: Any, step: int) -> dict:
        """The validation divergence, a token mean over the set (module docstring)."""
        from ..data.dataset import pad_token_id

        examples = dataset.examples
        if cfg.eval_batches:
            examples = examples[:cfg.eval_batches * cfg.prompts_per_step]
        source = "data" if all(e.completion_ids for e in examples) else "student"
        completions = completions_for(cfg, backend, examples, source, round_seed(cfg.seed, -1, 0))
        batch = DistillBatch(_rollouts(examples, completions, {}), cfg,
                             pad_token_id(backend.tokenizer), source)
        loss, total, tokens = make_loss(cfg), 0.0, 0.0
        for _, arrays in batch.micro_batches(list(range(len(batch))), cfg.batch_size):
            n = float(arrays["loss_mask"].sum())
            total += backend.evaluate(arrays, loss)["divergence"] * n
            tokens += n
        divergence = total / max(tokens, 1.0)
        return {"loss": divergence, "divergence": divergence,
                "on_student_samples": float(source == "student"),
                "completions/mean_length": float(np.mean([len(c.ids) for c in completions]))}
