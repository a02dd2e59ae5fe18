"""Online reinforcement learning: rollouts, rewards -> advantages, the GRPO family of losses."""
