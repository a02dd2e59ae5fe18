"""A Hugging Face Hub cache built on disk, as ``huggingface_hub`` lays it out, for offline tests.

    <HF_HOME>/hub/<models|datasets>--<org>--<name>/
        refs/main                       # the commit hash
        snapshots/<commit>/<files>      # the repository's files
        blobs/                          # (real caches symlink snapshot files here; copies work)
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_to_hub_cache(hf_home: Path, repo_id: str, files: Path | dict[str, bytes | str],
                     repo_type: str = "model") -> Path:
    """Put ``files`` (a directory to copy, or {relative path: content}) in the cache as the
    ``main`` snapshot of ``repo_id``; returns the snapshot directory."""
    org, name = repo_id.split("/")
    repo = Path(hf_home) / "hub" / f"{repo_type}s--{org}--{name}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    if isinstance(files, Path):
        shutil.copytree(files, snapshot, dirs_exist_ok=True)
    else:
        for relative, content in files.items():
            target = snapshot / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    return snapshot
