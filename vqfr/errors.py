"""The exceptions this package raises. Each names the file (when there is one) and the fix."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path


class VQFRError(Exception):
    """Base class. ``path`` is the file concerned (or None), ``reason`` what is wrong and ``fix`` what the user can do
    about it; ``str(error)`` is ``"{path}: {reason}. Fix: {fix}"``."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else Path(path)
        self.reason = message  # what is wrong, without the path and the fix
        self.fix = fix
        text = message if path is None else f"{path}: {message}"
        if fix:
            text = f"{text}. Fix: {fix}"
        super().__init__(text)


class InputError(VQFRError, ValueError):
    """An input image or array cannot be used (unreadable, wrong type, shape or size, NaN ...)."""


class CheckpointError(VQFRError, ValueError):
    """A checkpoint cannot be loaded: unsafe pickle, wrong layout, missing or unexpected keys, wrong version."""


class ConfigError(VQFRError, ValueError):
    """Model options are invalid or cannot be read."""


class EngineError(VQFRError, RuntimeError):
    """An exported engine (ONNX, TensorRT, AOTInductor) is corrupt or was built for other hardware or software."""


class BackendUnavailable(VQFRError, RuntimeError):
    """A backend cannot run here (missing package, no GPU, ...)."""


class OutputError(VQFRError, OSError):
    """An output cannot be written (unwritable folder, output would overwrite an input ...)."""


def run_command(action: Callable[[], str]) -> int:
    """The exit status of a command-line tool: run ``action`` and print what it returns (0), or print its error on
    stderr (1). The errors caught are this package's, which name the file and the fix, and the ImportError of a
    missing optional dependency, which names the extra to install; anything else is a bug and keeps its traceback."""
    try:
        message = action()
    except (VQFRError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0


def exit_status(main: Callable[[], int]) -> int:
    """``main()``'s exit status, for a ``python -m`` entry point. A reader that stops early (``| head``) closes the
    pipe: the command then ends quietly with 141 (128 + SIGPIPE, as a shell reports for ``cat``) instead of a
    BrokenPipeError traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        return 141
    return code
