"""ftedit's user-facing errors and the exit codes the command line gives them.

Every domain error derives from :class:`FteditError`: its message names the file, record, line and field where
known, ``hint`` says what to do, ``exit_code`` is what ``ftedit`` exits with. The command line prints such an
error as one or two lines, without a traceback (``-v`` adds it); any other exception is a bug and keeps its
traceback (see :func:`report_errors`).

Exit codes:

====  ==========================================================================
0     success
1     an unexpected error (a bug: traceback, please report it), or a failed bench entry
2     bad input: edit requests, config, recipe, ``--set`` values, command-line options
3     the model could not be found or loaded
4     the output directory cannot be used (exists, not ftedit's, not writable), or the disk is full
5     any other ftedit error: a run that cannot proceed (the base class's code)
130   interrupted (Ctrl-C)
====  ==========================================================================
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_BUG = 1
EXIT_INPUT = 2
EXIT_MODEL = 3
EXIT_OUTPUT = 4
EXIT_RUN = 5
EXIT_INTERRUPTED = 130

# Failures of the machine, not of ftedit: reported without a traceback (exit 4).
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class FteditError(Exception):
    """Base of every error ftedit reports to a user: a message, an optional hint and an exit code."""

    exit_code = EXIT_RUN

    def __init__(self, message: str = "", *, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(FteditError, ValueError):
    """Bad input: a file, record, config value or command-line option that cannot be used."""

    exit_code = EXIT_INPUT


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class UsageError(InputError):
    """Command-line options that do not fit together (or do not fit the chosen method)."""


class OutputDirError(FteditError, FileExistsError):
    """An output location that cannot be used: exists, holds files ftedit did not write, or is not writable."""

    exit_code = EXIT_OUTPUT


class Interrupted(FteditError):
    """Ctrl-C, with what was saved and how to continue in the message and hint."""

    exit_code = EXIT_INTERRUPTED


@contextmanager
def on_interrupt(error: Callable[[], Interrupted]) -> Iterator[None]:
    """Turn Ctrl-C inside the block into the :class:`Interrupted` that ``error()`` builds at that moment (what
    was kept, and how to continue)."""
    try:
        yield
    except KeyboardInterrupt:
        raise error() from None


def format_error(error: FteditError) -> list[str]:
    """The lines a user sees for ``error``: the message, then the hint if any."""
    lines = [f"error: {error}"]
    if error.hint:
        lines.append(f"hint: {error.hint}")
    return lines


def _write(lines: list[str]) -> None:
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.stderr.flush()


@contextmanager
def report_errors(verbose: Callable[[], bool] = lambda: False, passthrough: tuple[type, ...] = ()) -> Iterator[None]:
    """Turn errors raised inside the block into messages and ``SystemExit`` codes (see the module docstring).

    ``passthrough``: exception types left alone (the CLI framework's own exits and usage errors).
    ``verbose()`` is asked when an error happens: with ``-v`` domain errors also show their traceback.
    """
    try:
        yield
    except passthrough:
        raise
    except FteditError as e:
        _write(([traceback.format_exc()] if verbose() else []) + format_error(e))
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        _write(["interrupted"])
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _FULL_OR_READ_ONLY:
            _write([f"error: {e.strerror}: {e.filename}", "hint: free some space, or write somewhere else"])
            raise SystemExit(EXIT_OUTPUT) from None
        _write([traceback.format_exc(), "error: unexpected failure (a bug in ftedit, not a problem with your "
                                        "input); please report it with the command and the traceback above"])
        raise SystemExit(EXIT_BUG) from None
