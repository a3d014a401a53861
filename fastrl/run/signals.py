"""Stop handling: Ctrl-C and SIGTERM ask the training loop to stop at a safe point."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

from fastrl import accel


class StopRequest:
    """While installed, Ctrl-C (SIGINT) or SIGTERM (`kill`, a scheduler's preemption) asks
    the training loop to stop: it skips the rest of the cycle's updates (or rollout) and
    stops at the cycle's end, where nothing is half done: no env step in flight, no
    half-read reply, no half-written log record. A wait on an evaluation
    gives up on it. A second signal stops at once (KeyboardInterrupt).

    The first signal is acknowledged at once through `announce`: the cycle's end can be
    seconds away (the first update compiles), or never come (an env whose step hangs),
    and the user should know that the signal was heard and how to stop at once.

    Within `forced_after_grace()` (the training loop), a SIGTERM's stop that has not come
    in GRACE_S seconds is forced as a second signal's: a container's or a pod's stop
    sends one SIGTERM, then SIGKILL after its grace period (docker's 10 s, Kubernetes'
    30 s), which would cost a run whose env hangs its summary."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)  # SIGALRM: the grace period's end
    GRACE_S = 5.0

    def __init__(self, announce: Callable[[str], None] | None = None):
        self.requested = False
        self.forced = False  # set where the KeyboardInterrupt of a forced stop is caught: end processes at once
        self._announce = announce
        self._in_grace_scope = False

    @contextlib.contextmanager
    def installed(self):
        # Only the main thread may set handlers; a signal this process ignores stays ignored.
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                    if main and signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            accel.STOPPING.clear()  # the next run in this process (a sweep, a notebook) starts afresh

    @contextlib.contextmanager
    def forced_after_grace(self):
        """The scope of the grace period (see the class docstring): left before the run's
        last writes, which no timer may interrupt."""
        self._in_grace_scope = True
        try:
            yield
        finally:
            self._in_grace_scope = False
            if signal.getsignal(signal.SIGALRM) == self._handle:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGALRM:
            if self._in_grace_scope:
                raise KeyboardInterrupt
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        accel.STOPPING.set()  # a compile the signal cut short is not started again another way
        forced = (signum == signal.SIGTERM and self._in_grace_scope
                  and signal.getsignal(signal.SIGALRM) == self._handle)
        if forced:
            signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)
        if self._announce is not None:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            at_once = "on a second Ctrl-C or SIGTERM" + (f", or if that step is not done in {self.GRACE_S:g} s"
                                                          if forced else "")
            try:
                self._announce(f"{name}: the run stops after the step in progress and saves "
                               f"(it stops at once, still saving, {at_once})")
            # A signal in the middle of a write to the same stream (RuntimeError), a closed
            # or broken stdout: the stop goes on unannounced rather than failing.
            except (RuntimeError, OSError, ValueError):
                pass
