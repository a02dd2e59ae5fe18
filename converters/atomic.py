"""Write an output directory all at once or not at all.

Every converter writes into a hidden temporary sibling of its output directory and renames it
into place at the end, so an interrupted or failed conversion never leaves a half-written model
where a later run (or a cache lookup) would take it for a finished one. Temporary dirs left by a
killed process (its pid is in the name) are removed by the next conversion to the same place.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Fail early when `out_dir` exists and the caller did not ask to replace it."""
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir}: already exists (pass force=True / --force to replace it)")


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `out_dir`, on failure it is gone.

    With `force`, an existing `out_dir` is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o777)  # unlike mkdtemp's 0700, this honours the umask
    try:
        yield tmp
        _normalise_permissions(tmp)
        _move_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete temporary siblings left by killed conversions (their process no longer exists)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*-*"):
        pid = tmp.name[len(f".{out_dir.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: leave it alone
    return True


def _normalise_permissions(tmp: Path) -> None:
    """Give every file the umask's usual mode (safetensors creates its files 0600)."""
    file_mode = tmp.stat().st_mode & 0o666
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, file_mode)


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        if not force:  # someone else finished first
            raise FileExistsError(f"{out_dir}: appeared while converting; not replaced")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except OSError as error:
        if old is not None:  # put the previous output back
            os.replace(old / out_dir.name, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        raise FileExistsError(f"{out_dir}: could not be replaced ({error})") from error
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_file(out_file: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it becomes `out_file`, on failure it
    is deleted. An existing `out_file` is an error unless `force` (then replaced at the end).

    For single-file outputs (a GGUF); `atomic_output_dir` is the directory version.
    """
    out_file = Path(out_file)
    if out_file.exists() and not force:
        raise FileExistsError(f"{out_file}: already exists (pass force=True / --force to replace it)")
    if out_file.is_dir():
        raise IsADirectoryError(f"{out_file}: is a directory, not a file")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_file.parent.glob(f".{out_file.name}.tmp-*-*"):
        pid = stale.name[len(f".{out_file.name}.tmp-"):].split("-")[0]
        if stale.is_file() and pid.isdigit() and not _process_exists(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = out_file.parent / f".{out_file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: the converter wrote no output file")
        if out_file.exists() and not force:  # someone else finished first
            raise FileExistsError(f"{out_file}: appeared while converting; not replaced")
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

