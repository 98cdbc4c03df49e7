"""Stop signals for a daemon: SIGTERM and SIGINT reach its main thread, whichever thread the
kernel hands them to, and an exit that doesn't wait for threads."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class Signals:
    """SIGTERM and SIGINT for the main thread, whichever thread the kernel gives them to.

    The kernel hands a signal sent to the process to any of its threads that doesn't block
    it. Python runs its handler only in the main thread, at its next bytecode, and a main
    thread asleep in an untimed Event.wait never gets there: a daemon given SIGTERM went on
    polling. Python's C-level handler, in whichever thread caught the signal, also writes the
    signal's number to the wakeup fd, so a select() on it always wakes.

    Until `serving` is set there is nothing to finish, and a signal exits at once (0): a
    migration under way rolls back. From then on, `wait` and `poll` return the signals. Both
    are in place from the start, so a signal caught during the change is not lost. Create it
    in the main thread, before any other thread starts.
    """

    def __init__(self) -> None:
        self.serving = False
        self._inbox, self._wakeup = socket.socketpair()  # a socket, so Windows works too
        self._inbox.setblocking(False)
        self._wakeup.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._wakeup.fileno(), warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.serving:
            log.info("%s before the first pass: exiting", signal.Signals(signum).name)
            exit_now(0)
        # Serving: the signal is read from the wakeup fd (this only keeps the default action,
        # exit or KeyboardInterrupt, from running).

    def wait(self) -> signal.Signals:
        """The next SIGTERM or SIGINT."""
        received = self.poll(timeout=None)
        assert received is not None, "an untimed select only returns with a signal"
        return received

    def poll(self, timeout: float | None) -> signal.Signals | None:
        """The next SIGTERM or SIGINT, or None once `timeout` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._inbox], [], [], left)[0]:
                return None
            try:
                byte = self._inbox.recv(1)
            except BlockingIOError:
                continue
            if byte and byte[0] in STOP_SIGNALS:
                return signal.Signals(byte[0])

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._inbox.close()
        self._wakeup.close()

    def __enter__(self) -> Signals:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()


def exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)
