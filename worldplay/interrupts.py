"""SIGTERM ends a run the way Ctrl-C does: the same clean-up, then a conventional exit status.

Python turns SIGINT into :class:`KeyboardInterrupt`, so every ``with`` block and ``except
BaseException`` on the way out removes its temporary files. SIGTERM (``kill``, a batch scheduler,
``timeout``, a closing container) kills the process on the spot by default and leaves them. Inside
:func:`sigterm_raises` it raises :class:`Terminated`, a ``KeyboardInterrupt``, so the clean-up
code needs no second path. A second SIGTERM during the clean-up ends the process at once (the next
start removes what is left: :mod:`worldplay.leftovers`).

Exit statuses: 130 after SIGINT, 143 after SIGTERM (128 + the signal number, as shells report).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM is not caught
    raise Terminated("terminated by SIGTERM")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`. Nests; does nothing off the main thread
    (only it can handle signals) or where SIGTERM is deliberately ignored (SIG_IGN inherited)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, _raise_terminated):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(exc: KeyboardInterrupt) -> int:
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


def report_interrupt(prog: str, exc: KeyboardInterrupt) -> int:
    """One line on stderr; returns the exit status."""
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    print(f"{prog}: {what}; the unfinished output and its temporary files were removed", file=sys.stderr)
    return exit_status(exc)
