"""Triton kernels for the torch backend, each beside its pure-torch reference.

One kernel per file: :mod:`.fused_head` (lm_head + selective log-softmax, entropy,
log sum p^2), :mod:`.rmsnorm`, :mod:`.rope`, :mod:`.swiglu`, :mod:`.lora_mlp` (a LoRA MLP as
one autograd node), :mod:`.lora_qkv` (q/k/v projections with LoRA as one node). :mod:`.tolerances` holds the per-dtype tolerance table the tests use;
:mod:`.runtime` says whether Triton can run here. Importing this package never requires
Triton: without it every entry point runs its torch path (``impl="torch"``).
"""
