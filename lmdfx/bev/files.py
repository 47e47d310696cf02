"""Output files of the ``lmdfx`` command: the ``--out`` folder check and atomic writes.

Every file the command writes (reports, JSON records, PNG figures) goes through
:func:`atomic_open`: it is written under a temporary name in the same folder and moved onto its
final name with :func:`os.replace` only once complete, so an interrupted or failing run leaves
either the old file or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from lmdfx.errors import LMDError

__all__ = ["check_out_folder", "atomic_open", "write_text"]


def check_out_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as a :class:`Path` once it is usable as an output folder; nothing is created.

    An existing folder must be writable; a missing one must be creatable, i.e. its nearest
    existing ancestor is a writable folder. Otherwise an :class:`LMDError` names ``option`` and
    the fix.
    """
    out = Path(path)
    shown = str(path)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise LMDError(f"{option} {shown!r} is an existing file, not a folder; pass a folder "
                           "(it is created when missing) or remove the file.")
        if not os.access(out, os.W_OK | os.X_OK):
            raise LMDError(f"{option} folder {shown!r} is not writable; pick a folder you can write to "
                           "or fix its permissions.")
        return out
    ancestor = out.absolute().parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LMDError(f"{option} {shown!r} cannot be created: {str(ancestor)!r} is a file, not a folder; "
                       "pick another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LMDError(f"{option} {shown!r} cannot be created: {str(ancestor)!r} is not writable; pick a "
                       "folder you can write to.")
    return out


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: Optional[str] = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding``) or ``"wb"``. When the block raises
    (any exception, KeyboardInterrupt included), the temporary file is removed and ``path`` is
    left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    # a hidden name in the same folder, so os.replace stays on one file system
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    text = mode == "w"
    handle = open(tmp, "x" if text else "xb", encoding=(encoding or "utf-8") if text else None)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)
