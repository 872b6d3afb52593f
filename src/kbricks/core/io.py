"""Files and error lines shared by every layer: one atomic write, one writability probe, one way to turn an exception
(an OS failure above all) into the single line the CLI prints.

An atomic write goes to a temporary file in the target's directory, is flushed and fsynced, renamed over the target
and the directory is fsynced: a crash, a full disk or Ctrl-C leave either the old file or the new one, never a torn
file and never the temporary one.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import StorageError

# a leading C++ source location ("[enforce fail at inline_container.cc:672] ", "[../gloo/pair.cc:537] ")
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|cu|h|hpp):\d+\]\s*\.?\s*")

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def first_line(exc: BaseException, limit: int = 300, with_type: bool = False) -> str:
    """The first line of an exception's message, without a C++ source location, at most ``limit`` characters; the
    type's name when the message is empty (``with_type``: ``"ValueError: ..."``)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = _SOURCE_LOCATION.sub("", text.splitlines()[0])[:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def storage_error(exc: OSError, path: Union[str, Path], what: str) -> StorageError:
    """One line for an OS failure while writing ``what`` at ``path``: a full disk, a directory that is not
    writable, or anything else with the system's own words."""
    path = Path(path)
    where = path if path.is_dir() else path.parent
    code = exc.errno
    if code in _FULL:
        msg = (f"the disk is full: cannot write {what} {str(path)!r} ({exc.strerror or 'no space left'}); "
               f"free space on the disk holding {str(where)!r} and run again")
    elif code in _DENIED or isinstance(exc, PermissionError):
        msg = (f"{str(where)!r} is not writable: cannot write {what} ({exc.strerror or first_line(exc)}); "
               "fix its permissions or write somewhere else")
    else:
        msg = f"cannot write {what} {str(path)!r}: {exc.strerror or first_line(exc)}"
    err = StorageError(msg)
    err.errno, err.filename = code, str(path)
    return err


class _FdWriter:
    """A file object over a raw descriptor whose ``write`` writes everything or raises: a full disk surfaces as
    ``OSError(ENOSPC)``, not as a short write that torch reports as ``unexpected pos``."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: Optional[OSError] = None  # torch's zip writer reports a failed write as "unexpected pos"

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as exc:
            self.error = self.error or exc
            raise
        return done

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


def atomic_write_bytes(path: Union[str, Path], write: Union[bytes, Callable], what: str = "file") -> None:
    """Write ``path`` atomically; ``write`` is the bytes or a function of a binary file object. The file gets the
    usual permissions (0666 minus the umask). An OS failure is a :class:`StorageError` (also an ``OSError``) with
    one line naming ``what``, the path and the problem."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            out = _FdWriter(fd)
            try:
                if isinstance(write, (bytes, bytearray, memoryview)):
                    out.write(write)
                else:
                    write(out)
            except Exception:
                if out.error is not None:  # the writer's own error hid the OS's: report the OS's
                    raise out.error from None
                raise
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(exc, path, what) from None
    finally:
        if tmp is not None:  # any failure, KeyboardInterrupt included
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_text(path: Union[str, Path], text: str, what: str = "file") -> None:
    atomic_write_bytes(path, text.encode(), what)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); where a directory cannot be opened or synced, skip it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def writable_dir(path: Union[str, Path], what: str) -> Path:
    """Check that ``what`` (a directory, created if missing) accepts new files, before work whose result would be
    lost: a one-line :class:`StorageError` naming it otherwise. Returns the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        err = storage_error(exc, path, what)
        if exc.errno in _DENIED or isinstance(exc, PermissionError):
            err = StorageError(f"{what} {str(path)!r} is not writable ({exc.strerror or first_line(exc)}); "
                               "fix its permissions or write somewhere else")
            err.errno, err.filename = exc.errno, str(path)
        raise err from None
    return path


__all__ = ["first_line", "storage_error", "atomic_write_bytes", "atomic_write_text", "writable_dir"]
