"""Load the system OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links a slow reference BLAS. Loading Debian's ``libopenblas0-pthread``
globally (``RTLD_GLOBAL``) before ``import mlx.core`` lets MLX resolve its BLAS symbols to
OpenBLAS: matmuls get ~30x faster. Set ``POSTTRAIN_NO_OPENBLAS=1`` to skip it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded_from: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS once (Linux only); return its path, or None when not found or not wanted."""
    global loaded_from
    if loaded_from or sys.platform != "linux" or os.environ.get("POSTTRAIN_NO_OPENBLAS"):
        return loaded_from
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS
    arch = platform.machine()
    for pattern in CANDIDATES:
        path = pattern.format(arch=arch)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_from = path
            return path
    return None
