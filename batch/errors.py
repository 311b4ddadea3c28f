"""The exception hierarchy and exit codes: every user-facing failure is a :class:`BatchError`.

The CLI turns a ``BatchError`` into one line on stderr (a JSON event off a TTY) and its
``exit_code``; anything else escaping is a bug and keeps its traceback. The Python API
(:mod:`batch.pyapi`) raises the same classes; one raised after a run carries its
``summary`` (and ``results`` table when it could be read).
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # finished, but some request or task is not OK
EXIT_USAGE = 2  # usage, configuration, input or state error: nothing was sent
EXIT_LOCKED = 3  # another run holds the ledger: nothing was sent
EXIT_INTERRUPTED = 4  # SIGINT/SIGTERM
EXIT_PROVIDER = 5  # the provider refused the night: bad key, no balance, no such route or model
EXIT_LOCAL_FAULT = 6  # a local write failed after sending (disk full, read-only): see the message


class BatchError(Exception):
    """Base of every error the tool reports to its user."""

    exit_code = EXIT_USAGE
    summary: dict[str, Any] | None = None  # the run's summary, when the error ends a run (Python API)
    results: Any = None  # its results table (a polars DataFrame), when one could be read back


class InputError(BatchError):
    """An input file is missing, unreadable or lacks a required column."""


class ConfigError(BatchError):
    """An option, job file or environment setting is wrong (bad rate, no key...)."""


class StateError(BatchError):
    """The state file is corrupt, foreign, unwritable, or from an unknown schema version."""


class LockedError(BatchError):
    """Another run holds the state lock; nothing was sent."""

    exit_code = EXIT_LOCKED


class StoppedError(BatchError):
    """SIGINT/SIGTERM stopped the run; the ledger and the table say what was sent (Python API)."""

    exit_code = EXIT_INTERRUPTED


class ProviderError(BatchError):
    """The provider definitely refuses the night (preflight): nothing was sent."""

    exit_code = EXIT_PROVIDER


class LocalFaultError(BatchError):
    """A local write failed after requests were sent; the message says where the outcomes are."""

    exit_code = EXIT_LOCAL_FAULT
