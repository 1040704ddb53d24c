"""A write that fails says where and why in one line, and leaves nothing half-written behind.

Every file the project writes goes to a temporary name and is renamed when whole (shards, manifests,
checkpoints, results, plots). :func:`writing` wraps such a write: on a failure (a full disk, an I/O error,
a permission) it removes the temporary file or directory and raises :class:`WriteError`, whose message
names the path and the cause ("no space left on device while writing runs/r.incomplete/checkpoints/...").
What was written before under final names stays as it was, so a re-run resumes from there.
:func:`atomic_write_text` / :func:`atomic_write_bytes` are that for a whole file in memory; every stage
imports them from here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from aol_dist.errors import UserError

#: Free bytes below which a write error that names no errno (torch's zip writer) is taken for a full disk.
NEARLY_FULL = 1 << 20

_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EIO: "input/output error", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.ENOENT: "no such file or directory"}


class WriteError(UserError, OSError):
    """A failed write, with the path and the cause in its one-line message."""


def cause(error: BaseException, path: Path) -> str:
    """What went wrong, in words: the errno's (found anywhere in the exception's chain), or a full disk
    where the device has (almost) no space left, or the error's own first line."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _CAUSES:
            return _CAUSES[seen.errno]
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(_existing(path)).free
    except OSError:
        free = None
    if free is not None and free < NEARLY_FULL:
        return f"no space left on device ({free} bytes free)"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def remove(tmp: Path) -> None:
    """Remove a temporary file or directory, whatever state the failed write left it in."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: str | Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Run a write of ``path`` (through ``tmp``): a failure removes ``tmp`` and raises :class:`WriteError`.
    A :class:`WriteError` from a nested write passes through unchanged."""
    try:
        yield
    except WriteError:
        if tmp is not None:
            remove(Path(tmp))
        raise
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
        if tmp is not None:
            remove(Path(tmp))
        if isinstance(e, RuntimeError) and not _looks_like_io(e):
            raise
        raise WriteError(f"{cause(e, Path(path))} while writing {path}") from e


def _looks_like_io(error: RuntimeError) -> bool:
    text = str(error)
    return any(s in text for s in ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter"))


def output_dir(path: str | Path) -> Path:
    """Make ``path`` and its parents now, before the work whose results go there (an evaluation, an audit of
    a large split); a folder that cannot be made is a one-line :class:`WriteError`, not a traceback at the end."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot make the output folder {path}: {cause(e, path)}") from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name and rename; a failed write is a one-line :class:`WriteError`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path, tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name and rename, so ``path`` is whole or absent."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
