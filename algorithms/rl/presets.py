"""The online algorithms as presets of :class:`OnlineConfig`: each changes only defaults.

A preset's help texts, choices and flag aliases are its parent's (:func:`default`), so every
option is described once and any preset can be turned into any other with flags. Where a
paper and TRL disagree, the preset follows the paper and says where TRL differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import field
from .config import OnlineConfig

_FIELDS = {f.name: f for f in dataclasses.fields(OnlineConfig)}


def default(name: str, value: Any) -> Any:
    """``OnlineConfig``'s field ``name`` with another default (help, choices, aliases kept)."""
    meta = _FIELDS[name].metadata
    return field(value, meta["help"], meta.get("choices"), meta.get("aliases", ()))


@dataclasses.dataclass
class GRPOConfig(OnlineConfig):
    """GRPO: group relative policy optimisation (online RL with verifiable rewards).

    Defaults follow DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): sequence-mean loss
    (``loss_type=grpo``), advantages normalised by the group std, k3 KL in the loss with
    beta = 0.04, epsilon = 0.2. (The paper sampled G = 64 per prompt with a 1e-6 learning rate
    on a full model; the smaller G here fits a laptop. TRL's default is DAPO's loss with
    beta 0.)
    """


@dataclasses.dataclass
class DrGRPOConfig(OnlineConfig):
    """Dr. GRPO: GRPO without its length and std biases (Liu et al. 2025, arXiv 2503.20783).

    The advantage is ``r - mean(group)`` (``scale_rewards=none``), the token losses are summed
    and divided by a constant, completions x ``max_completion_length`` (``loss_type=dr_grpo``,
    as the paper's code divides by the generation budget), and there is no KL term (beta = 0).
    """

    loss_type: str = default("loss_type", "dr_grpo")
    scale_rewards: str = default("scale_rewards", "none")
    beta: float = default("beta", 0.0)


@dataclasses.dataclass
class DAPOConfig(OnlineConfig):
    """DAPO: decoupled clip and dynamic sampling policy optimisation (Yu et al. 2025,
    arXiv 2503.14476).

    Paper values: clip-higher with epsilon_low = 0.2 and epsilon_high = 0.28; a token-level loss
    over the whole batch (``loss_type=dapo``); no KL term (beta = 0); dynamic sampling (groups
    whose rewards are all equal are dropped and refilled); overlong filtering
    (``mask_truncated_completions``); the soft overlong punishment with L_max = 20480 and
    L_cache = 4096, a ratio of 0.2, kept here whatever ``max_completion_length`` is
    (``overlong_buffer = -1``: 51 tokens at the default 256).
    """

    loss_type: str = default("loss_type", "dapo")
    beta: float = default("beta", 0.0)
    epsilon_high: float = default("epsilon_high", 0.28)
    mask_truncated_completions: bool = default("mask_truncated_completions", True)
    dynamic_sampling: bool = default("dynamic_sampling", True)
    overlong_buffer: int = default("overlong_buffer", -1)


@dataclasses.dataclass
class GSPOConfig(OnlineConfig):
    """GSPO: group sequence policy optimisation (Zheng et al. 2025, arXiv 2507.18071).

    One importance ratio per completion, ``s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)``, clipped
    as a whole (``importance_sampling_level=sequence`` with the sequence-mean ``loss_type=grpo``).
    Paper values: clip range 3e-4 below and 4e-4 above, no KL term. The sequence ratio differs
    from 1 only off-policy, so raise ``--num-iterations`` to see the clipping act.
    """

    importance_sampling_level: str = default("importance_sampling_level", "sequence")
    beta: float = default("beta", 0.0)
    epsilon: float = default("epsilon", 3e-4)
    epsilon_high: float = default("epsilon_high", 4e-4)


@dataclasses.dataclass
class RLOOConfig(OnlineConfig):
    """RLOO: REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740).

    ``k`` completions per prompt; each one's baseline is the mean reward of the other ``k - 1``
    (``advantage_estimator=leave_one_out``); the KL to the reference is subtracted from the
    reward, summed over the completion (``kl_penalty=reward``, k1, beta 0.05); the gradient is
    ``A_i grad log pi(y_i)`` of the whole completion (``importance_sampling_level=sequence_sum``
    with the mean over completions). The paper's best setting samples k = 4 (TRL's default is 2)
    and updates on-policy; the ratio is clipped as TRL does (``--no-clip-policy-ratio`` for the
    paper's plain estimator; identical while ``num_iterations`` is 1).
    """

    num_generations: int = default("num_generations", 4)
    advantage_estimator: str = default("advantage_estimator", "leave_one_out")
    beta: float = default("beta", 0.05)
    kl_estimator: str = default("kl_estimator", "k1")
    kl_penalty: str = default("kl_penalty", "reward")
    importance_sampling_level: str = default("importance_sampling_level", "sequence_sum")


@dataclasses.dataclass
class ReinforcePPConfig(OnlineConfig):
    """REINFORCE++ (Hu et al. 2025, arXiv 2501.03262): REINFORCE with PPO's tricks, no critic.

    Per token ``r_t = -beta KL_t`` (k1 against the reference, beta 0.01) and the reward at the
    last token; the return ``G_t = sum_{s >= t} gamma^(s-t) r_s`` is normalised over every token
    of the generation batch (``advantage_estimator=global_batch``), the policy loss is PPO's
    clipped one, token-mean over the step (``loss_type=dapo``). One completion per prompt
    (the paper's k >= 1 variant for general RLHF).
    """

    num_generations: int = default("num_generations", 1)
    prompts_per_step: int = default("prompts_per_step", 16)
    advantage_estimator: str = default("advantage_estimator", "global_batch")
    beta: float = default("beta", 0.01)
    kl_estimator: str = default("kl_estimator", "k1")
    kl_penalty: str = default("kl_penalty", "reward")
    loss_type: str = default("loss_type", "dapo")


@dataclasses.dataclass
class ReinforcePPBaselineConfig(ReinforcePPConfig):
    """REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262): the group-sampling variant for
    reasoning tasks.

    ``G`` completions per prompt; each prompt's mean reward is subtracted first
    (``group_baseline``), then the advantages are normalised over the whole batch; the KL is a
    loss term with the unbiased-gradient k2 estimator (beta 1e-3), as in the paper's reference
    implementation.
    """

    num_generations: int = default("num_generations", 8)
    prompts_per_step: int = default("prompts_per_step", 4)
    group_baseline: bool = default("group_baseline", True)
    beta: float = default("beta", 1e-3)
    kl_estimator: str = default("kl_estimator", "k2")
    kl_penalty: str = default("kl_penalty", "loss")


@dataclasses.dataclass
class PPOConfig(OnlineConfig):
    """PPO for language models (Schulman et al. 2017; Ouyang et al. 2022 for RLHF).

    A value head on the policy's final hidden state (``advantage_estimator=gae``); per-token
    rewards ``-beta KL_t`` (k1, beta = TRL's kl_coef 0.05) plus the score at the last token;
    GAE with gamma 1 and lambda 0.95, advantages whitened over the batch; the clipped policy
    loss plus ``vf_coef`` (0.1) x the clipped value loss (``cliprange_value`` 0.2), token means
    over the step; 4 epochs (``num_iterations``, TRL's num_ppo_epochs) over each rollout batch
    of one completion per prompt; sampling temperature 0.7 (TRL's default). The score lands on
    the last completion token with V = 0 after it (TRL puts it one position later).
    """

    num_generations: int = default("num_generations", 1)
    prompts_per_step: int = default("prompts_per_step", 16)
    num_iterations: int = default("num_iterations", 4)
    advantage_estimator: str = default("advantage_estimator", "gae")
    normalize_advantages: bool = default("normalize_advantages", True)
    beta: float = default("beta", 0.05)
    kl_estimator: str = default("kl_estimator", "k1")
    kl_penalty: str = default("kl_penalty", "reward")
    loss_type: str = default("loss_type", "dapo")
    temperature: float = default("temperature", 0.7)


PRESETS = [
    ("grpo", GRPOConfig, ("group relative policy optimisation (online RL with verifiable "
                          "rewards; --loss-type grpo|bnpo|dr_grpo|dapo)")),
    ("dr_grpo", DrGRPOConfig, "Dr. GRPO: GRPO without length and std normalisation"),
    ("dapo", DAPOConfig, ("DAPO: clip-higher, token-level loss, overlong shaping and "
                          "filtering, dynamic sampling")),
    ("gspo", GSPOConfig, "GSPO: sequence-level importance ratio and clipping"),
    ("rloo", RLOOConfig, "RLOO: REINFORCE with a leave-one-out baseline, KL in the reward"),
    ("reinforce_pp", ReinforcePPConfig, ("REINFORCE++: token KL in the reward, returns "
                                         "normalised over the global batch")),
    ("reinforce_pp_baseline", ReinforcePPBaselineConfig, (
        "REINFORCE++-baseline: group mean subtracted, then global normalisation; k2 KL loss")),
    ("ppo", PPOConfig, "PPO: value head, GAE, clipped policy and value losses, several epochs"),
]
