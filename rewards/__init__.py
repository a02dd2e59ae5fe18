"""Reward functions for online algorithms (GRPO, DAPO, RLOO, PPO, online DPO).

Pure Python: this package never imports mlx or torch.

The contract. A reward function is a plain callable, called once per batch:

    def score(prompts, completions, answer=None, completion_ids=None, step=0, **kwargs):
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

- ``prompts``, ``completions``: one entry per completion; strings, or message lists for chat data
  (``completion_text(c)`` gives the text of either).
- every other dataset column arrives by name (``answer`` above), aligned with the completions;
  ``completion_ids`` (token ids, unpadded) and ``step`` (the optimizer step) are passed too, so
  accept ``**kwargs``.
- return ``list[float | None]`` of the batch's length; ``None`` = not applicable to that sample.
  NaN, inf, non-numbers or a wrong length are errors naming the function.
- ``async def`` functions are awaited concurrently; every call has a timeout.

Loading (``load_reward``): a built-in name (``math_answer``, ``xml_tags(think, answer)``), a file
(``rewards/my.py:score``), a module (``my_pkg.rewards:score``), an entry point in the group
``posttrain.rewards``, or ``model:<checkpoint>`` for a reward model built by the backend
(``ModelReward``). ``list_rewards`` / ``format_reward_list`` back ``--list-rewards``;
``RewardScorer`` calls several functions with ``--reward-weights`` and ``--reward-on-error``.
A complete example plugin: ``rewards/examples/my_reward.py``. Model-written code runs only inside
``rewards.sandbox`` (see its docstring for what the OS enforces and what a Python hook does).
"""

from .contract import ModelReward, RewardError, RewardFunction, completion_text, reward_name
from .registry import ENTRY_POINT_GROUP, format_reward_list, list_rewards, load_reward
from .scorer import ON_ERROR_CHOICES, RewardScorer, RewardScores, parse_reward_weights

__all__ = [
    "ENTRY_POINT_GROUP",
    "ON_ERROR_CHOICES",
    "ModelReward",
    "RewardError",
    "RewardFunction",
    "RewardScorer",
    "RewardScores",
    "completion_text",
    "format_reward_list",
    "list_rewards",
    "load_reward",
    "parse_reward_weights",
    "reward_name",
]
