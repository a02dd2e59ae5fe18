"""cuda_ft: the PyTorch backend of posttrain (transformers models, PEFT adapters, CUDA or CPU).

``python -m cuda_ft <algorithm> ...`` runs the shared training loop of :mod:`algorithms` on
:class:`cuda_ft.backend.TorchBackend`. Importing this package imports nothing heavy: torch,
transformers and peft load only when a backend is built, so ``algorithms`` and the CLI help stay
fast and usable on a machine without torch.
"""
