"""``python -m batch`` and the ``seedance-batch`` console script.

A SIGINT or SIGTERM while the libraries load (a second or more on a busy machine) is an
interruption like any later one: one JSON line and exit 4, never a ``KeyboardInterrupt``
traceback. Nothing has been read or sent yet. Once :mod:`batch.cli` is loaded its own
handling takes over.
"""

import json
import os
import signal
import sys


def _interrupted_while_loading(signum: int, _frame: object) -> None:
    sys.stderr.write(json.dumps({"event": "interrupted", "level": "warning", "signal": signal.Signals(signum).name,
                                 "phase": "startup", "detail": "nothing read or sent"}) + "\n")
    sys.stderr.flush()
    # At once: an unwinding import and the interpreter's shutdown after it take long enough
    # on a busy machine for a second Ctrl-C to meet the default handler (exit -2).
    os._exit(4)  # batch.errors.EXIT_INTERRUPTED, not imported yet on purpose


def run() -> None:
    previous = {s: signal.signal(s, _interrupted_while_loading) for s in (signal.SIGINT, signal.SIGTERM)}
    from batch.cli import entry

    for s, handler in previous.items():
        signal.signal(s, handler)
    entry()


if __name__ == "__main__":
    run()
