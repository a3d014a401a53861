"""The one-line live progress display of training and evaluation."""
from __future__ import annotations

import sys
import time


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One status line: redrawn in place on a terminal, printed every `every_s` otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None, every_s: float = 15.0):
        self.total = total
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last_print = -float("inf")
        self._width = 0

    def update(self, steps: int, elapsed: float, sps: float, ups: float,
               recent_return: float | None, last_eval: float | None) -> None:
        """The training line."""
        ret = f"{recent_return:8.1f}" if recent_return is not None else "       -"
        ev = f"{last_eval:7.1f}" if last_eval is not None else "      -"
        self.show(steps, "steps", f"{sps:7,.0f} sps | {ups:6,.0f} upd/s | return {ret} | eval {ev}", elapsed, sps)

    def show(self, done: int, unit: str, fields: str, elapsed: float, rate: float) -> None:
        """Draws `[bar] done/total unit | fields | elapsed (~time left)`; `rate`: units per second."""
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        line = (f"[{bar}] {done:>10,}/{self.total:,} {unit} | {fields} | {_fmt_duration(elapsed)}"
                f" (~{_fmt_duration(left) if left == left else '?'} left)")
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self.stream.flush()
        elif time.monotonic() - self._last_print >= self.every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = time.monotonic()

    def message(self, text: str) -> None:
        """A line that stays (e.g. an evaluation result), above the progress line;
        printed with the progress line off as well."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
