"""Reward functions for online algorithms (GRPO, DAPO, RLOO, PPO, online DPO).

Pure Python: this package never imports mlx or torch. The plugin contract, built-in rewards and
the code-execution sandbox are specified in issue 5 and land with it.
"""
