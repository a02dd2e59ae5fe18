"""Hugging Face Hub ids (``org/name``) for models and datasets, through ``huggingface_hub``.

    snapshot("Qwen/Qwen2.5-0.5B-Instruct")                  # -> .../snapshots/<commit>
    snapshot("HuggingFaceH4/ultrachat_200k", "dataset")

The local cache comes first: a snapshot already in it is used without any network call (so a
machine with the files works offline). Only when it is absent (or lacks a file the caller needs)
and the Hub is reachable is it downloaded. Absent and offline (``HF_HUB_OFFLINE=1``), or a
download that fails, is a :class:`HubError` naming the id, the cache directory and what to do.

The cache directory and the offline switch are read from the environment at each call
(``HF_HUB_CACHE`` > ``HUGGINGFACE_HUB_CACHE`` > ``HF_HOME``/hub > ``XDG_CACHE_HOME``/huggingface
/hub, as ``huggingface_hub`` reads them at import), so a changed ``HF_HOME`` takes effect at once.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

# An org/name id as the Hub spells them (letters, digits, "-", "_", "."; one slash).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a model snapshot needs: configs, safetensors weights, tokenizer and chat-template files.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken",
               "*.py", "tokenizer*"]


class HubError(ValueError):
    """A Hub id that could not be resolved; the message names the id and the cache."""


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with the Hub's characters (and no ``..``): a candidate Hub id."""
    return bool(REPO_ID.match(text)) and ".." not in text


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps snapshots, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) is set."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None,
                    complete: Callable[[Path], bool] | None = None) -> Path | None:
    """The snapshot of ``repo_id`` already in the local cache (no network), or None.

    ``complete(path)`` says whether the cached snapshot holds what the caller needs (a partial
    snapshot, e.g. one file fetched by another tool, counts as absent).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                      cache_dir=hub_cache_dir(), local_files_only=True))
    except (FileNotFoundError, HFValidationError, ValueError, OSError):
        return None
    if not path.is_dir() or (complete is not None and not complete(path)):
        return None
    return path


def snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None,
             allow_patterns: list[str] | None = None,
             complete: Callable[[Path], bool] | None = None) -> Path:
    """A local snapshot of ``repo_id``: the cached one, else downloaded (see module doc)."""
    found = cached_snapshot(repo_id, repo_type, revision, complete)
    if found is not None:
        return found
    what = "dataset" if repo_type == "dataset" else "model"
    cache = hub_cache_dir()
    fetch = (f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else ""))
    if hub_offline():
        raise HubError(f"{what} {repo_id!r} is not in the Hugging Face cache {cache} and the Hub "
                       f"is offline (HF_HUB_OFFLINE); fetch it once online ({fetch}) or give a "
                       "local path")
    from huggingface_hub import snapshot_download

    print(f"downloading {what} {repo_id} from the Hugging Face Hub into {cache}", file=sys.stderr,
          flush=True)
    try:
        path = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                      cache_dir=cache, allow_patterns=allow_patterns))
    except Exception as e:  # noqa: BLE001 - network, auth, gated, missing repo: all reported
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{what} {repo_id!r} is not in the Hugging Face cache {cache} and could "
                       f"not be downloaded: {type(e).__name__}: {reason}") from None
    if complete is not None and not complete(path):
        raise HubError(f"{what} {repo_id!r}: the snapshot {path} lacks the files needed "
                       f"(is it a {what} repository?)")
    return path
