import sys

from algorithms.cli import run_cli

sys.exit(run_cli("cuda_ft", "cuda_ft.backend:TorchBackend"))
