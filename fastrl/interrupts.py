"""Ctrl-C held through the moments an exception must not break (imports, forks), then delivered."""
from __future__ import annotations

import contextlib
import importlib
import signal
import threading
from types import ModuleType


@contextlib.contextmanager
def ctrl_c_held():
    """Holds Ctrl-C (SIGINT) until the block ends, then delivers it to the handler that was
    there (KeyboardInterrupt by default, a stop request in a training run).

    For imports and process starts: a KeyboardInterrupt inside a library's import can leave
    it half imported, and one raised inside `os.fork`'s hooks is swallowed there after it
    has left `logging`'s module lock taken, so the next fork or log call hangs for good.
    A second Ctrl-C is not held: whoever presses it twice means it."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield  # only the main thread may set handlers; an ignored Ctrl-C needs no holding
        return
    heard = False

    def hold(signum, frame):
        nonlocal heard
        heard = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if heard:
        signal.raise_signal(signal.SIGINT)


def import_held(module: str) -> ModuleType:
    """Imports `module` with Ctrl-C held: for libraries that take seconds to import."""
    with ctrl_c_held():
        return importlib.import_module(module)
