"""Interrupts that arrive while the optimizer writes take effect when the writes end.

A commit writes many tensors; a Ctrl-C between two of them would leave some updated and
the rest not. :func:`deferred_interrupts` holds ``SIGINT`` for the duration of a block of
writes and delivers it to the handler that was installed before (by default Python's,
which raises :class:`KeyboardInterrupt`) as soon as the block ends, so an interrupt lands
before or after the writes, never between two of them.

Signals reach only the main thread of the main interpreter; elsewhere the block runs as
it is (nothing can interrupt it there).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, List

__all__ = ["deferred_interrupts"]


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold ``SIGINT`` while the block runs; deliver it to the previous handler when it ends.

    Nested blocks deliver to the outer block's holder, so the interrupt takes effect when
    the outermost block ends. If the block raises and an interrupt was held, the interrupt
    is delivered all the same (a ``KeyboardInterrupt`` then carries the exception as its
    context).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[Any] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(frame)

    try:
        previous = signal.signal(signal.SIGINT, hold)
    except ValueError:  # not the main interpreter: signals are not delivered here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous, received[0])


def _deliver(handler: Any, frame: Any) -> None:
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)  # the default action, now that it is reinstalled
    # SIG_IGN (or None, a handler not installed from Python): nothing to deliver
