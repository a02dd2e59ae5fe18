"""The parts of ``scripts/bench.py``, one job per module: recipe, synthetic data, backend
detection, runners (ours, mlx-lm, TRL), measurement, settings check, parity, report, charts."""
