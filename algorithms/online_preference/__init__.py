"""Online preference learning: two completions per prompt, ranked by the reward functions, a
preference loss against the reference (online DPO, XPO, Nash-MD; docs/ALGORITHMS.md)."""
