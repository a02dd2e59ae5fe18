"""The options of every online algorithm: ``OnlineConfig`` (docs/ALGORITHMS.md, online RL).

One config holds every option of the online pipeline (rollout -> score -> advantage estimator
-> update); the presets of :mod:`algorithms.rl.presets` (grpo, dr_grpo, dapo, gspo, rloo,
reinforce_pp, reinforce_pp_baseline, ppo) change only defaults, so any preset can be turned
into any other with flags. Its defaults are GRPO's (DeepSeekMath).

A generation batch is ``prompts_per_step`` prompts times ``num_generations`` completions. It
serves ``num_iterations`` passes (mu; PPO's epochs), each cut into ``num_mini_batches``
shuffled mini-batches; one mini-batch is one optimiser step, accumulated in micro-batches of
``batch_size`` completions. That is why ``--grad-accumulation-steps`` must stay 1 here.
``rollout_batch_size`` is a separate memory knob: how many completions are sampled at once.

Importing this module imports neither mlx nor torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rewards.scorer import ON_ERROR_CHOICES

from ..config import TrainConfig, _bad, field

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_sum")
ESTIMATORS = ("group", "leave_one_out", "global_batch", "gae")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PENALTIES = ("loss", "reward")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def check_rollout_shape(cfg: Any, step: str) -> None:
    """The batch checks every online algorithm shares (the GRPO family, online preference
    learning, GKD): counts, one optimiser step per mini-batch (``step`` says what a step is),
    no packing, room for the prompt in ``--max-length``."""
    for name in ("prompts_per_step", "num_iterations", "num_mini_batches",
                 "max_completion_length"):
        if getattr(cfg, name) < 1:
            _bad(name, getattr(cfg, name), "must be >= 1")
    for name in ("rollout_batch_size", "log_completions_every", "top_k"):
        if getattr(cfg, name) < 0:
            _bad(name, getattr(cfg, name), "must be >= 0")
    if cfg.grad_accumulation_steps != 1:
        _bad("grad_accumulation_steps", cfg.grad_accumulation_steps,
             f"must be 1 for online training: one optimiser step is {step}; raise "
             "--prompts-per-step for bigger steps")
    if cfg.packing:
        _bad("packing", True, "is not supported for online training (each completion is one "
             "row)")
    if cfg.max_completion_length >= cfg.max_length:
        _bad("max_completion_length", cfg.max_completion_length,
             f"must be < --max-length ({cfg.max_length}), which also holds the prompt")


@dataclasses.dataclass
class OnlineConfig(TrainConfig):
    """Online RL: sample completions, score them with reward functions, turn the rewards into
    advantages, update the policy (GRPO's defaults; see the presets)."""

    ref_model: str = field(
        "", "reference model for the KL term (dir or short name); empty = the starting model: "
        "the base with adapters disabled for LoRA/DoRA, a frozen copy for full fine-tuning")
    # generation batch
    prompts_per_step: int = field(
        4, "prompts per generation batch; one optimiser step uses all prompts_per_step x "
        "num_generations completions, in micro-batches of --batch-size completions")
    num_generations: int = field(
        8, "completions sampled per prompt: the group size G (>= 2 for the group and "
        "leave_one_out estimators and --group-baseline)")
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
        [], "stop strings: a completion ends where one appears (the string is kept); "
        "repeatable", split=False)
    # policy update
    num_iterations: int = field(
        1, "mu (PPO: epochs): passes over each generation batch; > 1 makes the update "
        "off-policy, so the ratio departs from 1 and clipping acts", aliases=("num_ppo_epochs",))
    num_mini_batches: int = field(
        1, "optimiser steps per pass: the generation batch is shuffled and cut into this many "
        "mini-batches (PPO); each step after the first is off-policy")
    beta: float = field(
        0.04, "KL coefficient against the reference (TRL's PPO calls it kl_coef); 0 = no KL "
        "term and no reference model", aliases=("kl_coef",))
    kl_estimator: str = field(
        "k3", "per-token KL estimate with d = logp - ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d "
        "- 1", KL_ESTIMATORS)
    kl_penalty: str = field(
        "loss", "where beta x KL acts: a loss term per token (GRPO), or subtracted from the "
        "reward (PPO, RLOO, REINFORCE++: per token for token-level estimators, summed over the "
        "completion for sequence-level ones), computed from the rollout-time log-probs",
        KL_PENALTIES)
    clip_policy_ratio: bool = field(
        True, "PPO-style clipping of the importance ratio; off = the plain (unclipped) "
        "importance-weighted policy gradient (REINFORCE / RLOO as in their papers)")
    epsilon: float = field(0.2, "clip range: the ratio is clipped below at 1 - epsilon",
                           aliases=("cliprange",))
    epsilon_high: float = field(
        0.0, "upper clip: the ratio is clipped above at 1 + epsilon_high (DAPO clip-higher); "
             "0 = same as --epsilon")
    use_bias_correction_kl: bool = field(
        False, "multiply the k3 KL term by the importance ratio (DeepSeek-V3.2: an unbiased "
        "reverse-KL gradient; TRL's default); off = DeepSeekMath's plain k3 term")
    delta: float = field(
        0.0, "INTELLECT-2 two-sided clipping: cap the unclipped ratio at delta (must be > 1 + "
             "epsilon_high; the paper uses 4); 0 = off")
    importance_sampling_level: str = field(
        "token", "token: one ratio per token; sequence (GSPO): the geometric mean of a "
        "completion's token ratios, clipped as one (use with --loss-type grpo); sequence_sum "
        "(RLOO): the ratio of the completion's probabilities, exp(sum of token log-ratios)",
        IMPORTANCE_SAMPLING_LEVELS)
    entropy_coef: float = field(
        0.0, "entropy bonus: subtract entropy_coef x the mean token entropy (aggregated like "
        "the policy loss) from the loss; 0 = off")
    top_entropy_quantile: float = field(
        1.0, "train only on the highest-entropy tokens: keep tokens whose entropy under the "
        "rollout policy is at least the (1 - rho) quantile over the generation batch (Wang et "
        "al. 2025 keep 0.2); 1 = every token")
    loss_type: str = field(
        "grpo", "the policy loss and how its token losses are averaged: grpo = mean over "
        "completions of each completion's token mean; bnpo = token mean per micro-batch; "
        "dr_grpo = token sum / (completions x max_completion_length); dapo = token mean over "
        "the generation batch; cispo (MiniMax-M1) = -sg(min(w, 1 + epsilon_high)) A log p, "
        "token mean; sapo = the soft gate -(4 / tau) sigmoid(tau (w - 1)) A, completion mean; "
        "luspo = the clipped loss summed over each completion, mean over completions (use with "
        "--importance-sampling-level sequence); vespo = -phi(W) A log p with W the "
        "completion's probability ratio, token mean", LOSS_TYPES)
    sapo_temperature_pos: float = field(
        1.0, "sapo: gate temperature tau for tokens with advantage > 0")
    sapo_temperature_neg: float = field(
        1.05, "sapo: gate temperature tau for tokens with advantage <= 0 (the paper makes it "
        "larger, so negative updates fade faster off-policy)")
    vespo_k_pos: float = field(
        2.0, "vespo: exponent k of phi(W) = exp(lambda + k log W - lambda W) for advantage >= 0 "
        "(how fast W < 1 is down-weighted)")
    vespo_lambda_pos: float = field(
        3.0, "vespo: decay lambda of phi(W) for advantage >= 0 (how fast W > 1 is "
        "down-weighted)")
    vespo_k_neg: float = field(3.0, "vespo: exponent k of phi(W) for advantage < 0")
    vespo_lambda_neg: float = field(2.0, "vespo: decay lambda of phi(W) for advantage < 0")
    # rewards and advantages
    advantage_estimator: str = field(
        "group", "rewards -> advantages: group (GRPO: group mean, std scaling), leave_one_out "
        "(RLOO: the mean of the other completions of the prompt), global_batch (REINFORCE++: "
        "token returns normalised over the whole batch), gae (PPO: a value head and generalised "
        "advantage estimation)", ESTIMATORS)
    scale_rewards: str = field(
        "group", "group estimator: divide advantages by the reward std of the group, of the "
        "whole generation batch, or not at all (Dr. GRPO)", SCALE_REWARDS)
    normalize_advantages: bool = field(
        False, "leave_one_out and gae: whiten the advantages over the generation batch (mean "
        "0, std 1); global_batch always does")
    group_baseline: bool = field(
        False, "global_batch (REINFORCE++-baseline): subtract each prompt's mean reward before "
        "the global normalisation")
    gamma: float = field(1.0, "discount of per-token rewards (gae, global_batch)")
    lam: float = field(0.95, "GAE lambda: bias-variance trade-off of the advantage (gae)")
    vf_coef: float = field(0.1, "weight of the value loss (gae)")
    cliprange_value: float = field(
        0.2, "value clipping: a value moves at most this far from its rollout-time value per "
        "generation batch (gae)")
    whiten_rewards: bool = field(
        False, "gae: scale the per-token rewards by their std over the batch (no mean shift) "
        "before GAE")
    missing_eos_penalty: float = field(
        0.0, "subtract this from the reward of a completion that ended at the length limit "
        "without an end-of-sequence token or stop string; 0 = off")
    multi_objective_aggregation: str = field(
        "sum_then_normalize", "several rewards: weight-sum then normalise (GRPO), or normalise "
        "each per group, weight-sum, then normalise over the batch (GDPO; needs "
        "--scale-rewards group)", AGGREGATIONS)
    reward: list = field(  # noqa: RUF009
        [], "reward functions (at least one; repeat the flag for more): a built-in name "
        "(math_answer, 'xml_tags(think, answer)'; --list-rewards shows them), file.py:function, "
        "module:function, or model:<dir>", split=False)
    reward_weights: list = field(  # noqa: RUF009
        [], "one weight per --reward, as 1,0.5 or '1 0.5'; empty = 1.0 each")
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
        """Whether the loop must provide reference log-probs (the KL term is on)."""
        return self.beta > 0

    @property
    def reference_model(self) -> str:
        return self.ref_model

    @property
    def uses_value_head(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def generation_batch_size(self) -> int:
        """Completions per generation batch."""
        return self.prompts_per_step * self.num_generations

    @property
    def steps_per_generation(self) -> int:
        """Optimiser steps one generation batch serves: passes x mini-batches."""
        return self.num_iterations * self.num_mini_batches

    @property
    def off_policy(self) -> bool:
        """Whether some update sees a policy that moved since sampling (then the loss needs
        the rollout-time log-probs rather than ``stop_gradient(logp)``)."""
        return self.steps_per_generation > 1

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
        grouped = self.advantage_estimator in ("group", "leave_one_out") or self.group_baseline
        if self.num_generations < (2 if grouped else 1):
            _bad("num_generations", self.num_generations,
                 "must be >= 2: advantages compare completions within a group of G"
                 if grouped else "must be >= 1")
        check_rollout_shape(self, "one mini-batch of the generation batch (--prompts-per-step "
                            "x --num-generations completions / --num-mini-batches, in "
                            "micro-batches of --batch-size)")
        if self.max_sampling_rounds < 1:
            _bad("max_sampling_rounds", self.max_sampling_rounds, "must be >= 1")
        if self.unscored_patience < 0:
            _bad("unscored_patience", self.unscored_patience, "must be >= 0")
        if self.num_mini_batches > self.generation_batch_size:
            _bad("num_mini_batches", self.num_mini_batches,
                 f"must be <= the completions of a generation batch "
                 f"({self.generation_batch_size})")
        if self.dynamic_sampling and self.advantage_estimator != "group":
            _bad("dynamic_sampling", True, "drops groups whose rewards are all equal, which "
                 "only the group estimator defines; use --advantage-estimator group")

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
        if self.entropy_coef < 0:
            _bad("entropy_coef", self.entropy_coef, "must be >= 0 (a bonus on the entropy)")
        self._validate_loss_type()
        if not 0 < self.top_entropy_quantile <= 1:
            _bad("top_entropy_quantile", self.top_entropy_quantile,
                 "must be in (0, 1]: the share of highest-entropy tokens trained on")
        if not 0 <= self.gamma <= 1:
            _bad("gamma", self.gamma, "must be in [0, 1]")
        if not 0 <= self.lam <= 1:
            _bad("lam", self.lam, "must be in [0, 1]")
        if self.vf_coef < 0 or (self.uses_value_head and self.vf_coef == 0):
            _bad("vf_coef", self.vf_coef, "must be > 0 with the gae estimator (the value head "
                 "learns only from it)" if self.uses_value_head else "must be >= 0")
        if not self.cliprange_value > 0:
            _bad("cliprange_value", self.cliprange_value, "must be > 0")
        if self.kl_penalty == "reward" and self.beta > 0 \
                and self.multi_objective_aggregation == "normalize_then_sum":
            _bad("kl_penalty", "reward", "normalize_then_sum (GDPO) normalises each reward "
                 "function on its own, so a KL reward has no place; use --kl-penalty loss")
        if self.missing_eos_penalty < 0:
            _bad("missing_eos_penalty", self.missing_eos_penalty,
                 "must be >= 0 (it is subtracted from the reward)")

    def _validate_loss_type(self) -> None:
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos",
                     "vespo_lambda_neg"):
            if not getattr(self, name) > 0:
                _bad(name, getattr(self, name), "must be > 0")
        for name in ("vespo_k_pos", "vespo_k_neg"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            _bad("importance_sampling_level", self.importance_sampling_level,
                 "vespo forms its own completion-level weight from the summed token log-ratios; "
                 "use --importance-sampling-level token with --loss-type vespo")
        if self.loss_type in ("cispo", "sapo", "vespo") and self.delta > 0:
            _bad("delta", self.delta, f"caps the clipped objective's ratio; --loss-type "
                 f"{self.loss_type} has no clipped objective (drop --delta)")
        if self.loss_type in ("cispo", "sapo", "vespo") and not self.clip_policy_ratio:
            _bad("clip_policy_ratio", False, f"--loss-type {self.loss_type} shapes the ratio "
                 "itself; --no-clip-policy-ratio applies to the clipped loss types only")

    def _validate_rewards(self) -> None:
        self._validate_reward_functions()
        if self.multi_objective_aggregation == "normalize_then_sum" \
                and self.scale_rewards != "group":
            _bad("scale_rewards", self.scale_rewards,
                 "normalize_then_sum (GDPO) always divides by the group and batch std; use "
                 "--scale-rewards group with it, or --multi-objective-aggregation "
                 "sum_then_normalize")

    def _validate_reward_functions(self) -> None:
        """The checks of the reward options every rewarded online algorithm shares (the pair
        configs of :mod:`algorithms.online_preference` run them too)."""
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


