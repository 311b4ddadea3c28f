"""The exception hierarchy: every user-facing failure is a :class:`BatchError`.

The CLI turns a ``BatchError`` into one line on stderr and its ``exit_code``;
anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class BatchError(Exception):
    """Base of every error the tool reports to its user."""

    exit_code = 2


class InputError(BatchError):
    """An input file is missing, unreadable or lacks a required column."""


class ConfigError(BatchError):
    """An option, job file or environment setting is wrong (bad rate, no key...)."""


class StateError(BatchError):
    """The state file is corrupt, foreign, or from an unknown schema version."""


class LockedError(BatchError):
    """Another run holds the state lock; nothing was sent."""

    exit_code = 3
