"""Device-side metric accumulators, the TensorBoard writer and the progress line."""
from __future__ import annotations

import sys
import threading
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from fastrl.checkpoint import writing


class DeviceMeans:
    """Running sums of a fixed set of scalars, kept on the device.

    `add` is one in-place foreach add (no host sync, no allocation); the count of adds
    is known on the host. `read` copies the sums to the host once and resets.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self._sums = [torch.zeros((), dtype=torch.float32, device=device) for _ in names]
        self._count = 0

    def add(self, values: tuple[torch.Tensor, ...]) -> None:
        torch._foreach_add_(self._sums, list(values))
        self._count += 1

    def read(self) -> dict[str, float]:
        if self._count == 0:
            return {}
        host = torch.stack(self._sums).tolist()
        torch._foreach_zero_(self._sums)
        count, self._count = self._count, 0
        return {name: s / count for name, s in zip(self.names, host)}


class Writer:
    """TensorBoard scalars plus the run's config as text. A failed write (disk full) is a
    WriteFailed naming the run dir, not tensorboard's own error from its writer thread."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        # tensorboard's writer thread lets a failed write escape, to be printed as a traceback;
        # the next call here raises it again as WriteFailed, so that print is left out.
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_failed_writes
        try:
            with self._writing():
                self.tb = SummaryWriter(log_dir=run_dir)
        except BaseException:
            threading.excepthook = self._excepthook
            raise

    def config(self, config: dict) -> None:
        rows = "\n".join(f"|{k}|{v}|" for k, v in config.items())
        with self._writing():
            self.tb.add_text("config", f"|param|value|\n|-|-|\n{rows}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        with self._writing():
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def flush(self) -> None:
        with self._writing():
            self.tb.flush()

    def close(self) -> None:
        try:
            with self._writing():
                self.tb.close()
        finally:
            threading.excepthook = self._excepthook

    def _quiet_failed_writes(self, args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            self._excepthook(args)

    def _writing(self):
        return writing(f"TensorBoard events in {self.run_dir}")


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
