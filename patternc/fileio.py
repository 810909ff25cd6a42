"""Writing output files so that nothing is lost: ``atomic_write``.

Used by every command that writes a file (``compile -o`` / ``CompiledPattern.save``,
``fmt``, ``show --png``, the demo's outputs). Readers see the old file or the new one,
never half of one; a failed write leaves the target as it was and no temporary behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import IO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> str:
    """Write a file through ``write(f)`` (``f`` a binary file object) atomically.

    * A symbolic link is followed: its target is replaced, the link stays.
    * An existing target that is not a regular file (``/dev/stdout``, a FIFO) is written
      directly, since it cannot be replaced atomically.
    * A new file gets the usual permissions (``0o666 & ~umask``); a replaced one keeps its mode.

    Args:
        path: destination (str or path-like).
        write: called once with an open binary file.

    Returns:
        The path actually written (symlinks resolved).

    Raises:
        OSError: the folder is missing or not writable, the file exists and is not writable
            (``PermissionError``: the replacing rename would not notice), the disk is full, ...;
            nothing is left behind.
    """
    target = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "is a directory", target)
        with open(target, "wb") as f:
            write(f)
            f.flush()
        return target
    if st is not None and not os.access(target, os.W_OK):
        # the rename below needs only the folder's permission: a read-only file would be replaced
        raise PermissionError(13, "Permission denied (the file is read-only)", target)
    mode = (st.st_mode & 0o7777) if st is not None else (0o666 & ~_umask())
    folder = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def atomic_write_text(path, text: str) -> str:
    """``atomic_write`` of UTF-8 text (newlines written as given)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
