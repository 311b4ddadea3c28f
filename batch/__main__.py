"""``python -m batch`` and the ``seedance-batch`` console script.

A SIGINT or SIGTERM while the libraries load (a second or more on a busy machine) is an
interruption like any later one: one JSON line and exit 4, never a ``KeyboardInterrupt``
traceback. Nothing has been read or sent yet. Once :mod:`batch.cli` is loaded its own
handling takes over; after it, a signal while the run finishes its bookkeeping or the
interpreter shuts down no longer turns the decided exit code into a traceback or -2.
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
    try:
        entry()
    except KeyboardInterrupt:
        # Between the tool's own handlers (its last bookkeeping after the table is written):
        # whatever was sent is in the ledger; exit 4 as for any interruption, no traceback.
        sys.stderr.write(json.dumps({"event": "interrupted", "level": "warning", "signal": "SIGINT",
                                     "phase": "finishing"}) + "\n")
        raise SystemExit(4) from None
    finally:
        # The exit code is decided: a late signal during the interpreter's shutdown (which
        # resets the handlers) must not turn it into death by signal (exit -2).
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


if __name__ == "__main__":
    run()
