"""Configs of the GRPO family (ALGORITHMS.md section 9): GRPO, BNPO, Dr. GRPO, DAPO, GSPO.

``GRPOConfig`` holds every option; the presets ``DrGRPOConfig``, ``DAPOConfig`` and
``GSPOConfig`` change only defaults, so any preset can be turned into any other with flags.

One optimiser step consumes one whole generation batch: ``prompts_per_step`` prompts times
``num_generations`` completions each, accumulated in micro-batches of ``batch_size`` completions.
That is why ``--grad-accumulation-steps`` must stay 1 here. ``rollout_batch_size`` is a separate
memory knob: how many completions are sampled at once.

Importing this module imports neither mlx nor torch.
"""

from __future__ import annotations

import dataclasses
import math

from rewards.scorer import ON_ERROR_CHOICES

from ..config import TrainConfig, _bad, field

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclasses.dataclass
class GRPOConfig(TrainConfig):
    """GRPO: group relative policy optimisation (online RL with verifiable rewards).

    Defaults follow DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): sequence-mean loss
    (``loss_type=grpo``), advantages normalised by the group std, k3 KL with beta = 0.04,
    epsilon = 0.2. (The paper sampled G = 64 per prompt with a 1e-6 learning rate on a full
    model; the smaller G here fits a laptop.)
    """

    ref_model: str = field(
        "", "reference model for the KL term (dir or short name); empty = the starting model: "
        "the base with adapters disabled for LoRA/DoRA, a frozen copy for full fine-tuning")
    # generation batch
    prompts_per_step: int = field(
        4, "prompts per generation batch; one optimiser step uses all prompts_per_step x "
        "num_generations completions, in micro-batches of --batch-size completions")
    num_generations: int = field(8, "completions sampled per prompt: the group size G (>= 2)")
    rollout_batch_size: int = field(
        0, "completions sampled at once (a memory knob); 0 = the whole generation batch")
    # sampling
    max_completion_length: int = field(256, "tokens generated per completion at most")
    temperature: float = field(
        1.0, "sampling temperature; the loss takes log-probs at the same temperature")
    top_p: float = field(1.0, "nucleus sampling: keep the smallest set of tokens reaching top_p")
    top_k: int = field(0, "keep only the top_k most likely tokens; 0 = off")
    min_p: float = field(0.0, "drop tokens below min_p x the top probability; 0 = off")
    stop: list = field(  # noqa: RUF009 (field() returns a default_factory field)
        [], "stop strings: a completion ends where one appears (the string is kept)")
    # policy update
    num_iterations: int = field(
        1, "mu: optimiser steps per generation batch; > 1 makes the update off-policy, so the "
        "ratio departs from 1 and clipping acts")
    beta: float = field(
        0.04, "KL coefficient (k3 estimator against the reference); 0 = no KL term and no "
              "reference model")
    epsilon: float = field(0.2, "clip range: the ratio is clipped below at 1 - epsilon")
    epsilon_high: float = field(
        0.0, "upper clip: the ratio is clipped above at 1 + epsilon_high (DAPO clip-higher); "
             "0 = same as --epsilon")
    delta: float = field(
        0.0, "INTELLECT-2 two-sided clipping: cap the unclipped ratio at delta (must be > 1 + "
             "epsilon_high; the paper uses 4); 0 = off")
    importance_sampling_level: str = field(
        "token", "token: one ratio per token; sequence (GSPO): the geometric mean of a "
        "completion's token ratios, clipped as one (use with --loss-type grpo)",
        IMPORTANCE_SAMPLING_LEVELS)
    loss_type: str = field(
        "grpo", "how token losses are averaged: grpo = mean over completions of each "
        "completion's token mean; bnpo = token mean per micro-batch; dr_grpo = token sum / "
        "(completions x max_completion_length); dapo = token mean over the generation batch",
        LOSS_TYPES)
    # rewards and advantages
    scale_rewards: str = field(
        "group", "divide advantages by the reward std of the group, of the whole generation "
        "batch, or not at all (Dr. GRPO)", SCALE_REWARDS)
    multi_objective_aggregation: str = field(
        "sum_then_normalize", "several rewards: weight-sum then normalise (GRPO), or normalise "
        "each per group, weight-sum, then normalise over the batch (GDPO; needs "
        "--scale-rewards group)", AGGREGATIONS)
    reward: list = field(  # noqa: RUF009
        [], "reward functions (at least one): a built-in name (math_answer, "
        "'xml_tags(think, answer)'), file.py:function, module:function, or model:<dir>")
    reward_weights: list = field(  # noqa: RUF009
        [], "one weight per --reward; empty = 1.0 each")
    reward_on_error: str = field(
        "raise", "a reward function that raises: stop the run (raise), or score the failing "
        "samples None, which gives them advantage 0 (none)", ON_ERROR_CHOICES)
    reward_timeout: float = field(60.0, "seconds one reward-function call may take")
    unscored_patience: int = field(
        3, "stop the run when every reward of this many generation batches in a row is None/NaN "
           "(no reward signal: every advantage is 0); 0 = never")
    allow_weak_sandbox: bool = field(
        False, "let code_exec run model-written code where no sandboxing tool (bubblewrap, "
               "sandbox-exec) works, under the weaker in-process guard (rlimits, uid drop, "
               "audit hook)")
    # DAPO
    mask_truncated_completions: bool = field(
        False, "DAPO overlong filtering: completions cut at max_completion_length carry no loss "
        "(their rewards still count in the group statistics)")
    dynamic_sampling: bool = field(
        False, "DAPO dynamic sampling: drop groups whose rewards are all equal (no gradient) "
        "and sample more prompts to refill the generation batch")
    max_sampling_rounds: int = field(
        4, "with --dynamic-sampling: generation rounds per step at most before the batch is "
        "topped up with dropped groups")
    overlong_buffer: int = field(
        0, "DAPO soft overlong punishment L_cache in tokens: a reward falling linearly from 0 to "
           "-1 over the last overlong_buffer tokens before max_completion_length; 0 = off; "
           "-1 = 0.2 x max_completion_length (the paper's ratio)")
    log_completions_every: int = field(
        10, "write a sample of prompts, completions and rewards to <run-dir>/completions.jsonl "
            "every N steps; 0 = never")

    @property
    def effective_epsilon_high(self) -> float:
        """``epsilon_high``, or ``epsilon`` when it is 0 (unset): the upper clip is 1 + this."""
        return self.epsilon_high if self.epsilon_high > 0 else self.epsilon

    @property
    def needs_reference(self) -> bool:
        """Whether the loop must provide ``ref_logps`` (the KL term is on)."""
        return self.beta > 0

    @property
    def generation_batch_size(self) -> int:
        """Completions per generation batch, i.e. per optimiser step."""
        return self.prompts_per_step * self.num_generations

    @property
    def overlong_buffer_tokens(self) -> int:
        """L_cache in tokens: ``overlong_buffer``, or the paper's 0.2 x max_completion_length
        (4096 / 20480) when it is -1; 0 = no overlong shaping."""
        if self.overlong_buffer == -1:
            return max(1, int(0.2 * self.max_completion_length))
        return self.overlong_buffer

    def reward_weight_values(self) -> list[float]:
        """``reward_weights`` as floats, or 1.0 per reward when none were given."""
        return [float(w) for w in self.reward_weights] or [1.0] * len(self.reward)

    def validate(self) -> None:
        super().validate()
        self._validate_batch()
        self._validate_sampling()
        self._validate_update()
        self._validate_rewards()

    def _validate_batch(self) -> None:
        if self.num_generations < 2:
            _bad("num_generations", self.num_generations,
                 "must be >= 2: advantages compare completions within a group of G")
        for name in ("prompts_per_step", "num_iterations", "max_completion_length",
                     "max_sampling_rounds"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "must be >= 1")
        for name in ("rollout_batch_size", "log_completions_every", "top_k", "unscored_patience"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if self.grad_accumulation_steps != 1:
            _bad("grad_accumulation_steps", self.grad_accumulation_steps,
                 "must be 1 for online RL: one optimiser step is one generation batch "
                 "(--prompts-per-step x --num-generations completions, in micro-batches of "
                 "--batch-size); raise --prompts-per-step for bigger steps")
        if self.packing:
            _bad("packing", True, "is not supported for online RL (each completion is one row)")
        if self.max_completion_length >= self.max_length:
            _bad("max_completion_length", self.max_completion_length,
                 f"must be < --max-length ({self.max_length}), which also holds the prompt")

    def _validate_sampling(self) -> None:
        if not self.temperature > 0:
            _bad("temperature", self.temperature,
                 "must be > 0 (for greedy decoding use --top-k 1)")
        if not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            _bad("min_p", self.min_p, "must be in [0, 1)")
        if any(not s for s in self.stop):
            _bad("stop", self.stop, "stop strings must not be empty")

    def _validate_update(self) -> None:
        if self.beta < 0:
            _bad("beta", self.beta, "must be >= 0 (0 turns the KL term off)")
        if not 0 < self.epsilon < 1:
            _bad("epsilon", self.epsilon, "must be in (0, 1): the ratio is clipped at 1 - epsilon")
        if self.epsilon_high < 0 or 0 < self.epsilon_high < self.epsilon:
            _bad("epsilon_high", self.epsilon_high,
                 f"must be 0 (= --epsilon) or >= --epsilon ({self.epsilon})")
        if self.delta < 0 or 0 < self.delta <= 1 + self.effective_epsilon_high:
            _bad("delta", self.delta, f"must be 0 (off) or > 1 + epsilon_high "
                 f"({1 + self.effective_epsilon_high:g}); INTELLECT-2 uses 4")

    def _validate_rewards(self) -> None:
        if not self.reward:
            _bad("reward", self.reward, "needs at least one reward function, e.g. "
                 "--reward math_answer (--list-rewards shows the built-ins)")
        try:
            weights = self.reward_weight_values()
        except ValueError:
            _bad("reward_weights", " ".join(map(str, self.reward_weights)), "must be numbers")
        if not all(math.isfinite(w) for w in weights):
            _bad("reward_weights", " ".join(map(str, self.reward_weights)), "must be finite")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            _bad("reward_weights", " ".join(map(str, self.reward_weights)),
                 f"needs one weight per --reward ({len(self.reward)}), "
                 f"got {len(self.reward_weights)}")
        if not self.reward_timeout > 0:
            _bad("reward_timeout", self.reward_timeout, "must be > 0 seconds")
        if self.overlong_buffer < -1:
            _bad("overlong_buffer", self.overlong_buffer, "must be >= 0 tokens, or -1 for 0.2 x "
                 "--max-completion-length")
        if self.overlong_buffer_tokens >= self.max_completion_length:
            _bad("overlong_buffer", self.overlong_buffer,
                 f"must be < --max-completion-length ({self.max_completion_length}); DAPO's "
                 f"ratio is 0.2 x the length (here {int(0.2 * self.max_completion_length)}), "
                 "0 turns the shaping off")
        if self.multi_objective_aggregation == "normalize_then_sum" \
                and self.scale_rewards != "group":
            _bad("scale_rewards", self.scale_rewards,
                 "normalize_then_sum (GDPO) always divides by the group and batch std; use "
                 "--scale-rewards group with it, or --multi-objective-aggregation "
                 "sum_then_normalize")


@dataclasses.dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO: GRPO without its length and std biases (Liu et al. 2025, arXiv 2503.20783).

    The advantage is ``r - mean(group)`` (``scale_rewards=none``), the token losses are summed
    and divided by a constant, completions x ``max_completion_length`` (``loss_type=dr_grpo``,
    as the paper's code divides by the generation budget), and there is no KL term (beta = 0).
    """

    loss_type: str = field(
        "dr_grpo", "how token losses are averaged (see grpo --help)", LOSS_TYPES)
    scale_rewards: str = field(
        "none", "divide advantages by the reward std of the group, the batch, or not at all",
        SCALE_REWARDS)
    beta: float = field(0.0, "KL coefficient (k3 estimator); 0 = no KL term (the paper's value)")


@dataclasses.dataclass
class DAPOConfig(GRPOConfig):
    """DAPO: decoupled clip and dynamic sampling policy optimisation (Yu et al. 2025,
    arXiv 2503.14476).

    Paper values: clip-higher with epsilon_low = 0.2 and epsilon_high = 0.28; a token-level loss
    over the whole batch (``loss_type=dapo``); no KL term (beta = 0); dynamic sampling (groups
    whose rewards are all equal are dropped and refilled); overlong filtering
    (``mask_truncated_completions``); the soft overlong punishment with L_max = 20480 and
    L_cache = 4096, a ratio of 0.2, kept here whatever ``max_completion_length`` is
    (``overlong_buffer = -1``: 51 tokens at the default 256).
    """

    loss_type: str = field(
        "dapo", "how token losses are averaged (see grpo --help)", LOSS_TYPES)
    beta: float = field(0.0, "KL coefficient (k3 estimator); 0 = no KL term (the paper's value)")
    epsilon_high: float = field(
        0.28, "upper clip: the ratio is clipped above at 1 + epsilon_high (clip-higher); "
              "0 = same as --epsilon")
    mask_truncated_completions: bool = field(
        True, "overlong filtering: completions cut at max_completion_length carry no loss")
    dynamic_sampling: bool = field(
        True, "drop groups whose rewards are all equal and sample more prompts to refill")
    overlong_buffer: int = field(
        -1, "soft overlong punishment L_cache in tokens; -1 = 0.2 x max_completion_length "
            "(the paper's ratio); 0 = off")


@dataclasses.dataclass
class GSPOConfig(GRPOConfig):
    """GSPO: group sequence policy optimisation (Zheng et al. 2025, arXiv 2507.18071).

    One importance ratio per completion, ``s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)``, clipped
    as a whole (``importance_sampling_level=sequence`` with the sequence-mean ``loss_type=grpo``).
    Paper values: clip range 3e-4 below and 4e-4 above, no KL term. The sequence ratio differs
    from 1 only off-policy, so raise ``--num-iterations`` to see the clipping act.
    """

    importance_sampling_level: str = field(
        "sequence", "token: one ratio per token; sequence: one ratio per completion (GSPO)",
        IMPORTANCE_SAMPLING_LEVELS)
    beta: float = field(0.0, "KL coefficient (k3 estimator); 0 = no KL term (the paper's value)")
    epsilon: float = field(3e-4, "clip range: the ratio is clipped below at 1 - epsilon")
    epsilon_high: float = field(
        4e-4, "upper clip: the ratio is clipped above at 1 + epsilon_high; 0 = same as --epsilon")
