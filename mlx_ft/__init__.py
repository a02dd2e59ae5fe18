"""The MLX backend: ``python -m mlx_ft <algorithm> ...``.

Models come from mlx-lm's zoo; LoRA / DoRA layers are mlx-lm's, so adapters load with
``mlx_lm.load(model, adapter_path=...)``. Importing this package imports nothing heavy; the
backend module loads the system OpenBLAS (Linux) before MLX.
"""
