"""Atomic writes: every file and directory artefact hetinfer writes goes through here.

A write goes to a temporary beside the target, is fsynced, then renamed over it, so a reader
sees the old contents or the new, never half of them. Temporaries are named `.NAME.tmp-PID-RAND`
(and an overwritten directory waits as `.NAME.old-PID-RAND` until its replacement is in place);
a write killed with SIGKILL leaves them behind, so every write to NAME first removes those whose
process is gone. A target that cannot be written (a directory where a file goes, no permission,
a full disk) is a one-line HetinferError naming the path and the fix, with nothing left behind.
An exception raised by the caller's own code inside `atomic_file`/`atomic_dir` (reading a model,
say) propagates unchanged, after the temporary is removed: the caller knows what it was doing.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from hetinfer.errors import HetinferError

_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def _sibling(path: Path, kind: str) -> Path:
    """A fresh name of this module's naming beside `path`: `.NAME.KIND-PID-RAND`."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(directory: str | Path, name: str | None = None) -> None:
    """Remove the temporaries of this module's naming in `directory` (only those of target `name`
    when given) whose writing process no longer runs."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for e in entries:
        m = _TEMP.fullmatch(e.name)
        if m is None or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            Path(e.path).unlink(missing_ok=True)


@contextmanager
def _reported(path: Path, error: type[HetinferError] = HetinferError) -> Iterator[None]:
    """The helper's own file-system steps: an OSError becomes the one-line error for `path`."""
    try:
        yield
    except OSError as e:
        raise _write_error(path, e, error) from None


def _write_error(path: Path, e: OSError, error: type[HetinferError]) -> HetinferError:
    if e.errno == errno.EISDIR or (e.errno in (errno.EEXIST, errno.ENOTEMPTY) and path.is_dir()):
        return error(f"cannot write {path}: it is a directory; give a file path")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return error(f"cannot write {path}: a part of it is a file, not a directory; give another path")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or write elsewhere"
    else:
        fix = "choose another path"
    return error(f"cannot write {path} ({e.strerror or e}); {fix}")


def _prepare(path: str | Path, error: type[HetinferError] = HetinferError) -> Path:
    """The absolute target, its directory created and its stale temporaries removed."""
    path = Path(os.path.abspath(path))
    with _reported(path, error):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    return path


def check_writable(path: str | Path) -> None:
    """Fail now, with the one-line error, when `path` could not be written as a file (a directory, a
    parent that is a file, no permission): for an output written only after long work."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    code = (errno.EISDIR if path.is_dir() else errno.ENOTDIR if not parent.is_dir()
            else errno.EACCES if not os.access(parent, os.W_OK | os.X_OK) else 0)
    if code:
        raise _write_error(path, OSError(code, os.strerror(code)), HetinferError)


def temp_path(path: str | Path) -> Path:
    """A fresh name beside `path` for a scratch file, which the caller removes; should this process
    be killed first, the next call for `path` (or write to it) removes it."""
    return _sibling(_prepare(path), "tmp")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it replaces `path` when the block ends without error."""
    path = _prepare(path)
    tmp = _sibling(path, "tmp")
    try:
        with _reported(path):
            f = open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")  # mode as umask allows
        with f:
            yield f
            with _reported(path):
                f.flush()
                os.fsync(f.fileno())
        with _reported(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str as UTF-8) in one step."""
    with atomic_file(path) as f, _reported(Path(os.path.abspath(path))):
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Replace `path` with `obj` as JSON (one trailing newline) in one step."""
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


@contextmanager
def atomic_dir(path: str | Path, error: type[HetinferError] = HetinferError) -> Iterator[Path]:
    """An empty directory beside `path` to fill; when the block ends without error its files are
    fsynced and it is renamed to `path`, replacing an existing directory there (put back if the
    rename fails). Readers see the old directory or the new one (or, for the instant between two
    renames, none), never a mix. `error`: the class of the one-line error (an artefact's own)."""
    path = _prepare(path, error)
    if path.exists() and not path.is_dir():
        raise error(f"cannot write {path}: it exists and is not a directory; give another path")
    tmp = _sibling(path, "tmp")
    try:
        with _reported(path, error):
            tmp.mkdir()
        yield tmp
        with _reported(path, error):
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
            _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename directory `tmp` to `path`, moving an existing `path` aside first and back on failure."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)  # what stays is stale once this process ends


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
