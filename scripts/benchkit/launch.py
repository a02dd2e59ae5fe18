"""``python -m scripts.benchkit.launch --mlx-cpu <algorithm> [flags]``: ``python -m mlx_ft``
pinned to the CPU (for the mlx-cpu target on a machine where MLX also has a GPU).

MLX reads no environment variable for its default device, so this sets it, then hands the
arguments to the very CLI ``python -m mlx_ft`` runs.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--mlx-cpu":
        print("usage: python -m scripts.benchkit.launch --mlx-cpu <algorithm> [flags]",
              file=sys.stderr)
        return 2
    from mlx_ft.blas import preload_openblas

    preload_openblas()  # before MLX binds its BLAS (Linux), as python -m mlx_ft does
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    from algorithms.cli import run_cli

    return run_cli("mlx_ft", "mlx_ft.backend:MLXBackend", argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
