"""Named phase timers for the training loops, and the clock of time to solve."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Callable


def process_uptime() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since import)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()
_startup_s: float | None = None


def startup_s() -> float:
    """Seconds from this process's start to the end of the imports training needs (the
    interpreter, torch, gymnasium): what a fresh `fastrl train` pays before it trains.
    Measured at the first call, which importing fastrl.training makes as its last step."""
    global _startup_s
    if _startup_s is None:
        _startup_s = process_uptime()
    return _startup_s


class _Timer:
    """Re-usable context manager for one phase (no allocation per use)."""

    __slots__ = ("phases", "name", "t0")

    def __init__(self, phases: "Phases", name: str):
        self.phases, self.name, self.t0 = phases, name, 0.0

    def __enter__(self):
        p = self.phases
        if p.sync is not None:
            p.sync()
        now = time.perf_counter()
        if p.stack:  # pause the enclosing phase: times are exclusive, so they add up
            p.charge(p.stack[-1], now)
        p.stack.append(self)
        self.t0 = now

    def __exit__(self, *exc):
        p = self.phases
        if p.sync is not None:
            p.sync()
        now = time.perf_counter()
        p.charge(self, now)
        p.stack.pop()
        if p.stack:
            p.stack[-1].t0 = now


class Phases:
    """Accumulates wall seconds per named phase: `with phases("learn"): ...`.

    Phases may nest; each second is charged to the innermost open phase only, so the
    phase times never overlap and add up to (at most) the wall time.

    `sync` (e.g. torch.cuda.synchronize) runs at every phase boundary, so that queued
    device work is charged to the phase that launched it; it is set only while
    profiling. Disabled timers are a shared no-op context manager.
    """

    def __init__(self, enabled: bool = True, sync: Callable[[], None] | None = None):
        self.enabled = enabled
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.stack: list[_Timer] = []
        self._timers: dict[str, _Timer] = {}

    def charge(self, timer: _Timer, now: float) -> None:
        self.seconds[timer.name] = self.seconds.get(timer.name, 0.0) + now - timer.t0

    def __call__(self, name: str):
        if not self.enabled:
            return _NULL
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = _Timer(self, name)
        return timer

    def reset(self) -> None:
        """Forgets the totals (open phases keep timing from now)."""
        self.seconds.clear()
        now = time.perf_counter()
        for timer in self.stack:
            timer.t0 = now


_NULL = nullcontext()
