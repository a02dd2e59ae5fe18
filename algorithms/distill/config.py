"""GKD's options (docs/ALGORITHMS.md): the teacher, the data source of each step, the divergence.

One optimiser step takes ``prompts_per_step`` prompts. With probability ``lmbda`` (drawn from
(seed, step), so a resumed run draws the same) their completions are sampled from the STUDENT
(on-policy distillation); otherwise from the TEACHER when ``seq_kd``, else the data set's own
completions are used. The loss is the token mean, over the step's completion tokens, of the
generalised JSD between student and teacher (:mod:`algorithms.distill.jsd`), in micro-batches
of ``batch_size`` completions. Sampling and rollout options are the online RL ones (same flags
and checks); the defaults are TRL's GKDTrainer's (lmbda 0.5, beta 0.5, temperature 0.9, 128
new tokens). Importing this module imports neither mlx nor torch.
"""

from __future__ import annotations

import dataclasses

from ..config import TrainConfig, _bad, field
from ..rl.config import OnlineConfig, check_rollout_shape
from ..rl.presets import default


@dataclasses.dataclass
class GKDConfig(TrainConfig):
    """Generalised knowledge distillation (Agarwal et al. 2024, arXiv 2306.13649): the student
    learns the teacher's next-token distributions on its own samples (lmbda), the teacher's
    (seq_kd) or the data's completions."""

    teacher: str = field(
        "", "teacher model dir (or short name); it must use the student's tokenizer")
    lmbda: float = field(
        0.5, "share of steps trained on the student's own completions (on-policy); 1 = always, "
             "0 = never")
    seq_kd: bool = field(
        False, "the other steps train on completions sampled from the teacher (sequence-level "
               "KD) instead of the data set's")
    beta: float = field(
        0.5, "generalised JSD interpolation: 0 = forward KL(teacher || student), 1 = reverse "
             "KL(student || teacher), in between JSD_beta")
    distill_temperature: float = field(
        1.0, "temperature of both models' distributions in the divergence (TRL's GKD uses 1)")
    prompts_per_step: int = field(
        8, "prompts per optimiser step (one completion each), in micro-batches of --batch-size")
    rollout_batch_size: int = default("rollout_batch_size", 0)
    max_completion_length: int = default("max_completion_length", 128)
    temperature: float = field(0.9, "sampling temperature of student and teacher completions")
    top_p: float = default("top_p", 1.0)
    top_k: int = default("top_k", 0)
    min_p: float = default("min_p", 0.0)
    stop: list = default("stop", [])  # noqa: RUF009 (a default_factory field)
    log_completions_every: int = default("log_completions_every", 10)

    num_iterations = num_mini_batches = 1  # one optimiser step per batch of completions
    num_generations = 1
    steps_per_generation = OnlineConfig.steps_per_generation

    @property
    def needs_dataset_completions(self) -> bool:
        """Whether some step trains on the data set's completions."""
        return self.lmbda < 1 and not self.seq_kd

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            _bad("teacher", "", "is required: the teacher model dir (same tokenizer as --model)")
        for name in ("lmbda", "beta"):
            if not 0 <= getattr(self, name) <= 1:
                _bad(name, getattr(self, name), "must be in [0, 1]")
        if not self.distill_temperature > 0:
            _bad("distill_temperature", self.distill_temperature, "must be > 0")
        check_rollout_shape(self, "--prompts-per-step completions, in micro-batches of "
                            "--batch-size")
        OnlineConfig._validate_sampling(self)
