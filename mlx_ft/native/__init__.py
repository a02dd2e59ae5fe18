"""Fused float32 CPU kernels for the MLX backend, compiled on this machine on first use.

MLX's CPU backend runs every elementwise op as its own pass over memory and computes ``exp``
with a scalar polynomial; the hot chains of a training step (the attention softmax, SwiGLU and
its gradient, the head's ``exp(z - max)`` and its sum) are therefore most of what is not a
matrix product in an MLX step on a CPU. ``kernels.cpp`` implements them as MLX primitives, one
pass each, with an ``exp`` the compiler vectorises (the C++ file lists them with their
formulas); :mod:`mlx_ft.fastmath` wraps them with their gradients.

The extension is built with CMake against the installed MLX (its headers and ``libmlx``) and
nanobind, with ``-march=native``, into ``$POSTTRAIN_CACHE/native/<key>`` (default
``~/.cache/posttrain/native``); the key hashes the sources, the MLX, nanobind and Python
versions and the machine, so an upgrade rebuilds. ``scripts/install.sh`` builds it ahead
(``python -m mlx_ft.native``); otherwise the first MLX run on a CPU does (~30 s, once).

When it cannot be built or loaded (no C++ compiler, no CMake, a nanobind whose ABI differs from
MLX's), :func:`kernels` returns None, :func:`status` says why, and the MLX backend uses plain MLX
ops (the ``powf``-based path of :mod:`mlx_ft.fastmath`): slower, the same numbers within float
rounding. ``POSTTRAIN_MLX_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

SOURCES = ("kernels.cpp", "CMakeLists.txt")
_HERE = Path(__file__).resolve().parent
_state: dict = {}


class BuildError(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get("POSTTRAIN_MLX_NATIVE", "1") != "0"


def cache_root() -> Path:
    if os.environ.get("POSTTRAIN_NATIVE_CACHE"):
        return Path(os.environ["POSTTRAIN_NATIVE_CACHE"]).expanduser()
    base = os.environ.get("POSTTRAIN_CACHE") or os.path.join("~", ".cache", "posttrain")
    return Path(base).expanduser() / "native"


def build_key() -> str:
    """Hash of what the built library depends on: sources, MLX, nanobind, Python, machine."""
    import mlx.core as mx

    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((_HERE / name).read_bytes())
    digest.update(f"{mx.__version__}|{_nanobind_version()}|{sys.version}|{platform.machine()}"
                  f"|{platform.system()}".encode())
    return digest.hexdigest()[:16]


def _nanobind_version() -> str:
    try:
        import nanobind
    except ImportError:
        return "missing"
    return nanobind.__version__


def _library(directory: Path) -> Path | None:
    found = sorted(directory.glob("_kernels*.so")) + sorted(directory.glob("_kernels*.pyd"))
    return found[0] if found else None


def build(force: bool = False) -> Path:
    """Compile the extension into the cache (once per key; concurrent callers wait on a
    lock) and return the library's path. Raises :class:`BuildError` with the reason."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = build_key()
    target = root / key
    with _locked(root / f"{key}.lock"):
        if force and target.exists():
            shutil.rmtree(target)
        if (found := _library(target)) is not None:
            return found
        _check_tools()
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{key}-") as tmp:
            build_dir = Path(tmp) / "build"
            out_dir = Path(tmp) / "out"
            out_dir.mkdir()
            cmake = _cmake()
            configure = [cmake, "-S", str(_HERE), "-B", str(build_dir),
                         f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                         f"-DPOSTTRAIN_OUTPUT_DIR={out_dir}"]
            compile_ = [cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 1)]
            for step, command in (("configure", configure), ("build", compile_)):
                done = subprocess.run(command, check=False, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
                    raise BuildError(f"cmake {step} failed:\n" + "\n".join(tail))
            if _library(out_dir) is None:
                raise BuildError(f"the build produced no _kernels library in {out_dir}")
            os.replace(out_dir, target)
    return _library(target)


def _cmake() -> str | None:
    """CMake on PATH, else the one the ``cmake`` Python package installed (its console script
    may not be on PATH, e.g. under pyenv)."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake
    except ImportError:
        return None
    candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
    return str(candidate) if candidate.exists() else None


def _check_tools() -> None:
    if _cmake() is None:
        raise BuildError("no 'cmake' on PATH (install CMake >= 3.24: pip install cmake)")
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c.split()[0]) for c in compilers):
        raise BuildError("no C++ compiler on PATH (install g++ or clang++, or set CXX)")
    if _nanobind_version() == "missing":
        raise BuildError("the Python package 'nanobind' is not installed (pip install nanobind)")


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock, builds go to distinct temporary directories
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(path: Path) -> ModuleType:
    """Import the built library and check that it accepts MLX arrays (same nanobind ABI)."""
    import mlx.core as mx

    spec = importlib.util.spec_from_file_location("mlx_ft.native._kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        value = module.exp(mx.array([0.0, 1.0]))
        mx.eval(value)
    except TypeError as e:
        raise BuildError(f"the built kernels do not accept MLX arrays (nanobind "
                         f"{_nanobind_version()} vs the one MLX {mx.__version__} was built "
                         f"with?): {e}") from e
    if abs(value.tolist()[1] - 2.718281828) > 1e-6:
        raise BuildError(f"the built kernels compute exp(1) = {value.tolist()[1]}")
    return module


def kernels() -> ModuleType | None:
    """The kernels module, building it on first use; None when switched off or unavailable
    (:func:`status` then says why; the reason is printed once)."""
    if not enabled():
        return None
    if "module" not in _state:
        try:
            path = _library(cache_root() / build_key())
            if path is None:
                print("mlx_ft: building the native CPU kernels (once per install, ~30 s)",
                      file=sys.stderr, flush=True)
                path = build()
            _state["module"] = load(path)
            _state["status"] = f"loaded from {path}"
        except (BuildError, OSError, ImportError) as e:
            _state["module"] = None
            _state["status"] = f"unavailable: {e}"
            first_line = str(e).splitlines()[0]
            print(f"mlx_ft: native CPU kernels unavailable ({first_line}); using plain MLX ops "
                  "(slower). Build them with: python -m mlx_ft.native", file=sys.stderr)
    return _state["module"]


def status() -> str:
    if not enabled():
        return "switched off (POSTTRAIN_MLX_NATIVE=0)"
    kernels()
    return _state["status"]
