"""One way to write a file so that a reader, a crash or a full disk never sees or leaves half of it.

`atomic_write_bytes(path, data)` writes `data` to a temporary file in the same directory (same file
system, so the rename is atomic), flushes and fsyncs it, renames it over `path` and fsyncs the
directory so the rename itself survives a power cut. On any failure (ENOSPC, EFBIG under RLIMIT_FSIZE,
EIO, an interrupt) the temporary file is removed and `path` is exactly what it was before: the user's
file is never truncated. The text and JSON forms are thin wrappers.

Every writer of a small file that must stay whole (run-directory JSON, task files, markers, `nemoc fmt
--write`, plan emission) goes through here; large streamed outputs (checkpoints, indexed data) use
`replace_durably` after writing their own temporary file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir", "replace_durably"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a fully written (and fsync'd) `tmp` over `path` and fsync the directory."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically; on failure `path` is untouched and no temporary is left.

    `mode` sets the permission bits of the new file; by default an existing file keeps its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # SIGXFSZ would kill the process over RLIMIT_FSIZE before write() can fail with EFBIG; make it an error.
    old_xfsz = _ignore_sigxfsz()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        replace_durably(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        _restore_sigxfsz(old_xfsz)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _ignore_sigxfsz():
    if not hasattr(signal, "SIGXFSZ"):
        return None
    try:
        return signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread: the signal disposition cannot change here
        return None


def _restore_sigxfsz(old) -> None:
    if old is None:
        return
    try:
        signal.signal(signal.SIGXFSZ, old)
    except ValueError:
        pass
