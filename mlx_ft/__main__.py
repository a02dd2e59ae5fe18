import sys

from algorithms.cli import run_cli

sys.exit(run_cli("mlx_ft", "mlx_ft.backend:MLXBackend"))
