"""Write an output directory (or file) all at once or not at all, and never clobber a stranger.

Every converter writes into a hidden temporary sibling of its output and renames it into place
at the end, after every file (and the directory) is fsync'ed, so an interrupted or failed
conversion never leaves a half-written model where a later run (or a cache lookup) would take it
for a finished one. Temporary dirs left by a killed process (its pid is in the name) are removed
by the next conversion to the same place. A full disk (``ENOSPC``, ``EDQUOT``) is a
:class:`DiskFullError` naming the output, with the partial output already removed.

``--force`` replaces an existing output only when it is a previous output of the same verb (the
verb writes a marker file, :data:`OUTPUT_MARKER`, into every directory it produces) or an empty
directory; never a file with a directory (or the reverse), never a symbolic link, never a
directory someone else made, so it can never delete anything but its own earlier result.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

OUTPUT_MARKER = ".posttrain-output.json"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing an output; nothing partial was left."""


def disk_full(target: str | os.PathLike, error: BaseException) -> DiskFullError:
    why = getattr(error, "strerror", None) or str(error)
    full = DiskFullError(f"{target}: disk full while writing it ({why}); nothing was "
                         "written (the partial output was removed)")
    full.errno = getattr(error, "errno", None) or errno.ENOSPC
    return full


def is_disk_full(error: BaseException, where: Path | None = None) -> bool:
    """``ENOSPC`` / ``EDQUOT``; or, for libraries that report a failed write their own way
    (MLX raises ``RuntimeError: Unable to write``), any error while ``where``'s filesystem has
    (almost) no space left."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    if where is None or not isinstance(error, Exception):
        return False
    try:
        stats = os.statvfs(where)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (children before parents)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself is synced
    finally:
        os.close(fd)


def check_output_dir(out_dir: Path, force: bool, producer: str | None = None) -> None:
    """Fail early unless ``out_dir`` may be written: it does not exist, or ``force`` is given and
    it is a directory that ``producer`` (a verb name) wrote before, or an empty one. ``producer``
    None (the trainer's own run-dir outputs) skips the ownership check, not the others."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise FileExistsError(f"{out_dir}: is a symbolic link; give the real path of the output")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: is a file, not a directory; an output directory never "
                              "replaces a file, even with --force")
    if not force:
        raise FileExistsError(f"{out_dir}: already exists (pass force=True / --force to replace it)")
    if producer is None or not any(out_dir.iterdir()):
        return
    previous = _marker(out_dir)
    if previous != producer:
        what = f"an output of {previous}" if previous else f"not an output of {producer} (no " \
                                                           f"{OUTPUT_MARKER})"
        raise FileExistsError(f"{out_dir}: is {what}; --force replaces only a previous output of "
                              f"{producer} (or an empty directory), so nothing else is ever "
                              "deleted: remove it yourself or choose another path")


def _marker(out_dir: Path) -> str | None:
    try:
        verb = json.loads((out_dir / OUTPUT_MARKER).read_text()).get("verb")
    except (OSError, ValueError, AttributeError):
        return None
    return verb if isinstance(verb, str) else None


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False,
                      producer: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `out_dir`, on failure it is gone.

    With `force`, an existing `out_dir` is replaced only after the new one is complete, and only
    when :func:`check_output_dir` allows it; ``producer`` marks the new one as its output.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force, producer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o777)  # unlike mkdtemp's 0700, this honours the umask
    try:
        yield tmp
        if producer is not None:
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"verb": producer}) + "\n")
        _normalise_permissions(tmp)
        fsync_tree(tmp)
        if force:  # again: it may have changed meanwhile
            check_output_dir(out_dir, force, producer)
        _move_into_place(tmp, out_dir, force)
        _fsync_dir(out_dir.parent)
    except BaseException as error:
        full = is_disk_full(error, tmp.parent)  # measured before the partial output is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(out_dir, error) from error
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
def atomic_output_file(out_file: str | os.PathLike, force: bool = False,
                       is_previous: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it becomes `out_file`, on failure it
    is deleted. An existing `out_file` is an error unless `force`, and then it is replaced (at
    the end) only if ``is_previous(out_file)`` says it is a previous output of the same verb.

    For single-file outputs (a GGUF); `atomic_output_dir` is the directory version.
    """
    out_file = Path(out_file)
    check_output_file(out_file, force, is_previous)
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
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_file)
        _fsync_dir(out_file.parent)
    except BaseException as error:
        full = is_disk_full(error, out_file.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(out_file, error) from error
        raise


def check_output_file(out_file: Path, force: bool,
                      is_previous: Callable[[Path], bool] | None = None) -> None:
    """The file version of :func:`check_output_dir`."""
    out_file = Path(out_file)
    if out_file.is_symlink():
        raise FileExistsError(f"{out_file}: is a symbolic link; give the real path of the output")
    if out_file.is_dir():
        raise IsADirectoryError(f"{out_file}: is a directory, not a file; an output file never "
                                "replaces a directory, even with --force")
    if not out_file.exists():
        return
    if not force:
        raise FileExistsError(f"{out_file}: already exists (pass force=True / --force to replace it)")
    if is_previous is not None and not is_previous(out_file):
        raise FileExistsError(f"{out_file}: is not a previous output of this verb; --force "
                              "replaces only that, so nothing else is ever deleted: remove it "
                              "yourself or choose another path")


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` whole (temporary sibling, fsync, rename) or is left as it was;
    a full disk is a :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(path, error) from error
        raise
