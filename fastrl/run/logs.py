"""What a run tells the user as it goes: TensorBoard scalars (`Writer`), learner
statistics summed on the device (`DeviceMeans`), and the training log that writes them
and redraws the progress line once per log window (`TrainingLog`)."""
from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from fastrl.checkpoint import writing
from fastrl.config import TrainConfig
from fastrl.errors import WriteFailed
from fastrl.progress import Progress


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

    def __init__(self, run_dir: str, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step. TensorBoard (and `fastrl plot`) then
        hide what the stopped run wrote from that step on, after its last checkpoint, so
        the curves go on from the checkpoint without an overlap."""
        self.run_dir = run_dir
        # tensorboard's writer thread lets a failed write escape, to be printed as a traceback;
        # the next call here raises it again as WriteFailed, so that print is left out.
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_failed_writes
        try:
            with self._writing():
                self.tb = SummaryWriter(log_dir=run_dir, purge_step=purge_step)
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

    def series(self, name: str, values: list[float], steps: list[int]) -> None:
        """One scalar per value, each at its own step (an episode's return where it ended)."""
        with self._writing():
            for value, step in zip(values, steps):
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


class TrainingLog:
    """One training run's TensorBoard file and progress line. Each log window (every
    `log_interval` seconds) writes throughput, episode statistics, learner means, the
    loop's own scalars and phase times, and redraws the progress line."""

    def __init__(self, run_dir: Path, config: TrainConfig, total_steps: int, resumed_at: int | None = None):
        """`resumed_at`: the env steps a resumed run goes on from."""
        self.config = config
        self.writer = Writer(str(run_dir), purge_step=resumed_at)
        try:
            if resumed_at is None:
                self.writer.config(config.to_dict())
        except BaseException:
            with contextlib.suppress(WriteFailed):  # the first failure is the one to report
                self.writer.close()
            raise
        self.progress = Progress(total_steps, config.progress)
        self.recent_returns: deque = deque(maxlen=100)
        self._last: tuple | None = None  # (time, env_steps, updates) at the last write

    def message(self, text: str) -> None:
        self.progress.message(text)

    def due(self, env_steps: int, updates: int, wall_s: float) -> bool:
        now = time.perf_counter()
        if self._last is None:  # the first window opens at the first step, after start-up
            self._last = (now, env_steps, updates)
            # Where the window opens is the first point that maps the run's steps to its
            # wall clock: a run shorter than one window has two points, not one.
            self.writer.scalars({"time/wall_s": wall_s}, env_steps)
        return now - self._last[0] >= self.config.log_interval

    def write(self, env_steps: int, updates: int, wall_s: float, episodes: tuple[list, list, list, int],
              scalars: dict[str, float], phase_seconds: dict[str, float], last_eval: float | None) -> None:
        """`episodes`: (returns, lengths, end steps) of the episodes finished in the window
        and the count of all so far. A window without an env step writes nothing. Each
        episode's return is also written at the step it ended (episodes/return), for the
        learning curve of `fastrl plot`; the run's wall-clock seconds (time/wall_s) map its
        steps to time."""
        if self._last is None or env_steps == self._last[1]:
            return
        now = time.perf_counter()
        t_prev, steps_prev, updates_prev = self._last
        dt = max(now - t_prev, 1e-9)
        sps = (env_steps - steps_prev) / dt
        ups = (updates - updates_prev) / dt
        self._last = (now, env_steps, updates)
        returns, lengths, ends, count = episodes
        self.recent_returns.extend(returns)
        out = {"charts/sps": sps, "charts/updates_per_s": ups, "time/wall_s": wall_s, **scalars}
        if returns:
            out["charts/episodic_return"] = sum(returns) / len(returns)
            out["charts/episodic_length"] = sum(lengths) / len(lengths)
            out["charts/episodes"] = count
        for name, seconds in phase_seconds.items():
            out[f"time/{name}_s"] = seconds
        self.writer.scalars(out, env_steps)
        self.writer.series("episodes/return", returns, ends)
        recent = sum(self.recent_returns) / len(self.recent_returns) if self.recent_returns else None
        self.progress.update(env_steps, wall_s, sps, ups, recent, last_eval)

    def evaluation(self, result, env_steps: int, screened: bool) -> None:
        """An evaluation's result (an EvalResult) of the weights after `env_steps`."""
        self.writer.scalars({"eval/return_mean": result.mean, "eval/return_std": result.std,
                             "eval/episodes": result.episodes}, env_steps)
        self.writer.flush()
        note = f" (screened after {result.episodes})" if screened else ""
        self.message(f"eval @ {env_steps:,} steps: {result.mean:.1f} ± {result.std:.1f} "
                     f"over {result.episodes} episodes{note}")

    def close(self) -> None:
        """Ends the progress line. The writer is closed apart (`writer.close()`): that
        last write may fail, and the run's other files are written first."""
        self.progress.close()


def nonfinite(stats: dict[str, float]) -> list[str]:
    """'name is value' for each statistic that is a nan or an infinity."""
    return [f"{name} is {value}" for name, value in stats.items() if not math.isfinite(value)]
