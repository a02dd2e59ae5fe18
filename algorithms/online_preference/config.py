"""Options of the online preference algorithms (online DPO, XPO, Nash-MD).

Each prompt gets two completions: both from the policy (online DPO), one from the policy and
one from the reference (XPO), or one from the policy and one from the geometric mixture of
policy and reference (Nash-MD). The reward functions rank them (or give Nash-MD its preference
probability); the loss compares the policy with the reference on the pair. One generation batch
is ``prompts_per_step`` pairs; it serves ``num_iterations`` x ``num_mini_batches`` optimiser
steps, each accumulated in micro-batches of ``batch_size`` PAIRS (a pair never splits).

Sampling, reward and rollout options are the online RL ones (:class:`algorithms.rl.config.
OnlineConfig`: the same flags, help and checks); defaults follow TRL's trainers where the papers
leave them open (temperature 0.9, 64 new tokens, beta 0.1). Importing this module imports
neither mlx nor torch.
"""

from __future__ import annotations

import dataclasses

from ..config import TrainConfig, _bad, field
from ..rl.config import OnlineConfig, check_rollout_shape
from ..rl.presets import default

PAIR_LOSS_TYPES = ("sigmoid", "ipo")
KL_LEVELS = ("sequence", "token")


@dataclasses.dataclass
class PairConfig(TrainConfig):
    """Options every online preference algorithm shares (see the module docstring)."""

    ref_model: str = default("ref_model", "")
    prompts_per_step: int = field(
        8, "prompts per generation batch, two completions each (a pair); one optimiser step "
        "uses every pair of its mini-batch, in micro-batches of --batch-size pairs")
    rollout_batch_size: int = default("rollout_batch_size", 0)
    max_completion_length: int = default("max_completion_length", 64)
    temperature: float = field(
        0.9, "sampling temperature (the loss scores log-probs at temperature 1: the policy "
        "itself, as DPO does)")
    top_p: float = default("top_p", 1.0)
    top_k: int = default("top_k", 0)
    min_p: float = default("min_p", 0.0)
    stop: list = default("stop", [])  # noqa: RUF009 (a default_factory field)
    num_iterations: int = default("num_iterations", 1)
    num_mini_batches: int = field(
        1, "optimiser steps per pass: the pairs are shuffled and cut into this many "
        "mini-batches")
    beta: float = field(0.1, "beta: the strength of the pull towards the reference")
    missing_eos_penalty: float = default("missing_eos_penalty", 0.0)
    reward: list = default("reward", [])  # noqa: RUF009
    reward_weights: list = default("reward_weights", [])  # noqa: RUF009
    reward_on_error: str = default("reward_on_error", "raise")
    reward_timeout: float = default("reward_timeout", 60.0)
    unscored_patience: int = default("unscored_patience", 3)
    allow_weak_sandbox: bool = default("allow_weak_sandbox", False)
    overlong_buffer: int = default("overlong_buffer", 0)
    log_completions_every: int = default("log_completions_every", 10)

    # what the second completion of a pair is sampled from (Backend.sample's source)
    second_source = "policy"
    num_generations = 2  # completions per prompt (the pair)
    mask_truncated_completions = False

    # the shared online properties, as OnlineConfig defines them
    steps_per_generation = OnlineConfig.steps_per_generation
    overlong_buffer_tokens = OnlineConfig.overlong_buffer_tokens
    reward_weight_values = OnlineConfig.reward_weight_values

    @property
    def mixture_weight(self) -> float:
        """``SamplingParams.mixture_coef`` of the second completion (Nash-MD only)."""
        return 0.5

    @property
    def reference_model(self) -> str:
        return self.ref_model

    @property
    def needs_reference(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        check_rollout_shape(self, "one mini-batch of the generation batch's pairs, in "
                            "micro-batches of --batch-size pairs")
        if self.num_mini_batches > self.prompts_per_step:
            _bad("num_mini_batches", self.num_mini_batches,
                 f"must be <= the pairs of a generation batch ({self.prompts_per_step})")
        if not self.beta > 0:
            _bad("beta", self.beta, "must be > 0")
        if self.unscored_patience < 0:
            _bad("unscored_patience", self.unscored_patience, "must be >= 0")
        if self.missing_eos_penalty < 0:
            _bad("missing_eos_penalty", self.missing_eos_penalty,
                 "must be >= 0 (it is subtracted from the reward)")
        OnlineConfig._validate_sampling(self)
        OnlineConfig._validate_reward_functions(self)


@dataclasses.dataclass
class OnlineDPOConfig(PairConfig):
    """Online DPO (Guo et al. 2024, arXiv 2402.04792): two completions of the policy per prompt,
    the one the reward functions score higher is chosen (a tie: the first), DPO's loss against
    the reference on the pair."""

    loss_type: str = field(
        "sigmoid", "sigmoid = -log sigma(beta h); ipo = (h - 1/(2 beta))^2, h the pair's "
        "log-ratio margin (summed log-probs, not length-normalised)", PAIR_LOSS_TYPES)


@dataclasses.dataclass
class XPOConfig(OnlineDPOConfig):
    """XPO, exploratory preference optimisation (Xie et al. 2024, arXiv 2405.21046): online DPO
    where the second completion comes from the reference, plus the exploration term
    alpha x log pi(y_ref) (pushing probability away from the reference's samples)."""

    alpha: float = field(1e-5, "weight of the exploration term alpha x sum_t log pi(y_ref)")

    second_source = "reference"

    def validate(self) -> None:
        super().validate()
        if self.alpha < 0:
            _bad("alpha", self.alpha, "must be >= 0 (0 = online DPO against reference samples)")


@dataclasses.dataclass
class NashMDConfig(PairConfig):
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886): the second completion comes from the
    geometric mixture of policy and reference; the preference probability
    P = sigma(r(y) - r(y')) drives a REINFORCE update of the policy's completion, with a
    REINFORCE estimate of the KL to the reference."""

    mixture_coef: float = field(
        0.5, "weight of the reference in the sampling mixture (1 - c) log pi + c log ref")
    kl_level: str = field(
        "sequence", "REINFORCE estimate of the KL term: sequence = sg(sum_t (log pi - log ref)) "
        "x sum_t log pi (the paper's score-function gradient); token = sum_t sg(log pi - log "
        "ref) log pi_t (TRL's)", KL_LEVELS)

    second_source = "mixture"

    @property
    def mixture_weight(self) -> float:
        return self.mixture_coef

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.mixture_coef <= 1:
            _bad("mixture_coef", self.mixture_coef, "must be in [0, 1]")
