"""Atomic file writes: a temporary file in the destination folder, fsync'd, then a rename into place (the folder
itself is fsync'd by callers that need the rename to survive a crash: :func:`fsync_path`).

A reader never sees a half-written output, and an interrupted run leaves either the old file or the new one. The
temporary file is named ``.{name}.{random}.partial{suffix}`` (hidden, and never taken for an input by the CLI;
``name`` shortened when the whole would pass 255 bytes); it is created with the permissions a plain ``open()``
would give (0666 less the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from vqfr.errors import OutputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_with", "fsync_path", "PARTIAL_MARK"]

#: Every temporary file's name contains this (``.photo.png.3f2a9c1e.partial.png``).
PARTIAL_MARK = ".partial"
#: The longest file name, in bytes, that common file systems take (NAME_MAX).
_NAME_MAX = 255


def _output_error(path: Path, exc: OSError) -> OutputError:
    err = OutputError(f"cannot be written ({exc.strerror or exc})", path=path,
                      fix="check that the output folder exists, is writable and has free space")
    err.errno = exc.errno
    return err


def _temp_prefix(path: Path) -> str:
    """``.{name}``, shortened so the temporary name stays within :data:`_NAME_MAX` bytes: an output whose own name
    fits must not fail because its temporary name is longer."""
    room = _NAME_MAX - len(os.fsencode(f".{'0' * 8}{PARTIAL_MARK}{path.suffix}"))
    name = path.name
    while name and len(os.fsencode(f".{name}")) > room:
        name = name[:-1]
    return f".{name}"


def _create_temp(path: Path) -> Path:
    folder = path.parent
    prefix = _temp_prefix(path)
    for _ in range(100):
        tmp = folder / f"{prefix}.{secrets.token_hex(4)}{PARTIAL_MARK}{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(path, exc) from exc
        return tmp
    raise OutputError(f"cannot create a temporary file in {folder}", path=path, fix="clean up the output folder")


def fsync_path(path: str | Path) -> None:
    """Flush ``path`` to the disk: a file's data (writers that take a path, such as ``torch.save``, close it
    unsynced), or a folder's entries (so that renames into it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'd and renamed to ``path``, on any error (or
    interrupt) removed.

    The temporary name keeps the final suffix, so writers that pick a format from the suffix work. The fsync before
    the rename means a crash cannot leave an empty or partial file under the final name.

    Raises:
        OutputError: the folder cannot be written (the OSError's errno is kept), or the body raised an OSError.
    """
    path = Path(path)
    tmp = _create_temp(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise _output_error(path, exc) from exc
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'd before the rename by :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
