"""Shared pytest fixtures: the tiny tokenizer and tiny Llama / Qwen2 models, built once."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiny import make_tiny_model, make_tiny_tokenizer

import mlx_ft  # noqa: F401 - loads the system OpenBLAS before any test imports mlx.core


# After mlx_ft, never before: whether the system OpenBLAS is loaded before torch decides the BLAS
# some torch CPU ops use, hence their float rounding (the TRL parity tier is pinned to it).
def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


# Triton kernels are tested on the CPU through Triton's interpreter, which must be on before any
# kernel is defined (cuda_ft.kernels is imported by backend tests too). `--kernels auto` never
# picks the interpreter, so only tests that ask for Triton explicitly run it. On a GPU, unset.
if "TRITON_INTERPRET" not in os.environ and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Tokenised-data cache entries written by tests go to a temporary dir, not the user's."""
    previous = os.environ.get("POSTTRAIN_DATA_CACHE")
    os.environ["POSTTRAIN_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield
    if previous is None:
        os.environ.pop("POSTTRAIN_DATA_CACHE", None)
    else:
        os.environ["POSTTRAIN_DATA_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), family="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), family="qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer loaded through transformers (what both backends hand the data layer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def write_jsonl(tmp_path):
    """Write lines (dicts are JSON-encoded, strings written verbatim) to ``tmp_path/name``."""
    import json

    def write(lines, name: str = "train.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                for line in lines))
        return path

    return write


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs mounted on a fresh dir (a disk that fills up); skipped where mounting is
    not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    import subprocess

    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
