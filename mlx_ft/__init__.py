"""The MLX backend: ``python -m mlx_ft <algorithm> ...``.

Models come from mlx-lm's zoo; LoRA / DoRA layers are mlx-lm's, so adapters load with
``mlx_lm.load(model, adapter_path=...)``. Importing this package imports nothing heavy (no mlx); the
package loads the system OpenBLAS (Linux) before anything imports MLX.
"""

from .blas import preload_openblas

preload_openblas()

