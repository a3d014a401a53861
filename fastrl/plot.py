"""Learning curves from a run's TensorBoard events (`fastrl plot`, and curves.png at the
end of every run): each episode's return with its moving average, and the greedy
evaluations' mean ± std, against env steps or wall-clock seconds. Runs of one setting
(seeds) are drawn as the median of their moving averages with the interquartile band.

The events are read with tensorboard's own reader, which hides what a stopped run wrote
after its last saved state once the run is resumed (see Writer's purge_step).
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastrl.checkpoint import atomic_write
from fastrl.errors import ConfigError

X_AXES = ("steps", "wall")


class Curves(NamedTuple):
    """One run's curves (numpy arrays), in env-step order."""

    name: str
    setting: str             # the config apart from seed and run dir: runs that share it are seeds of one setting
    episode_steps: np.ndarray  # env steps when each episode ended
    episode_returns: np.ndarray
    eval_steps: np.ndarray
    eval_means: np.ndarray
    eval_stds: np.ndarray
    log_steps: np.ndarray    # env steps of each log window, with the run's wall-clock seconds then
    log_wall_s: np.ndarray

    def wall(self, steps: np.ndarray) -> np.ndarray:
        """The run's wall-clock seconds at `steps` (interpolated between log windows)."""
        return np.interp(steps, self.log_steps, self.log_wall_s) if len(self.log_steps) else np.full(len(steps), np.nan)


def read_curves(run_dir: str | os.PathLike) -> Curves:
    """A run's curves; a ConfigError naming the run dir if it has none to draw."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"cannot plot {str(path)!r}: no such run directory")
    if not list(path.glob("events.out.tfevents.*")):
        raise ConfigError(f"cannot plot {str(path)!r}: it holds no TensorBoard events yet (is it a run directory?)")
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # every point, not a sample
    # It logs a warning for each purge it makes (a resumed run's, which is expected): quiet here.
    logger = logging.getLogger("tensorboard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        logger.setLevel(level)
    tags = set(events.Tags()["scalars"])

    def series(tag: str) -> tuple[np.ndarray, np.ndarray]:
        points = sorted(events.Scalars(tag), key=lambda e: e.step) if tag in tags else []
        return np.array([e.step for e in points], dtype=np.int64), np.array([e.value for e in points], dtype=float)

    episode_steps, returns = series("episodes/return")
    if not len(returns):
        raise ConfigError(f"cannot plot {str(path)!r}: no episode has ended in it yet")
    eval_steps, means = series("eval/return_mean")
    _, stds = series("eval/return_std")
    log_steps, wall = series("time/wall_s")
    setting = ""
    with_config = path / "config.json"
    if with_config.exists():
        config = json.loads(with_config.read_text())
        setting = json.dumps({k: v for k, v in config.items() if k not in ("seed", "run_dir")}, sort_keys=True)
    return Curves(path.name, setting, episode_steps, returns, eval_steps, means, stds, log_steps, wall)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the up to `window - 1` before it."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot(run_dirs: list[str | os.PathLike], out: str | os.PathLike, x: str = "steps", window: int = 100,
         title: str | None = None, labels: dict[str, str] | None = None) -> Path:
    """Draws the runs' curves into the PNG `out` (written atomically); returns its path.
    Runs that share a setting are drawn as one median curve with its interquartile band.
    `labels` (run dir -> a setting's name, as a sweep gives them): the runs to draw as one,
    and what to call them."""
    if x not in X_AXES:
        raise ConfigError(f"invalid x={x!r}: must be {' or '.join(X_AXES)}")
    if window < 1:
        raise ConfigError(f"invalid window={window}: must be a positive number of episodes")
    if not str(out).endswith(".png"):
        raise ConfigError(f"invalid out={str(out)!r}: must be a .png file")
    runs = [read_curves(d) for d in run_dirs]
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    settings: dict[str, list[Curves]] = {}
    for run_dir, run in zip(run_dirs, runs):
        settings.setdefault(labels[str(run_dir)] if labels else run.setting or run.name, []).append(run)
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, group) in enumerate(settings.items()):
        colour = colours[i % len(colours)]
        if labels:
            label = f"{key} ({len(group)} seeds: median, IQR)" if len(group) > 1 else key
        else:
            label = group[0].name if len(group) == 1 else f"{group[0].name} and {len(group) - 1} more (median, IQR)"

        def xs(run: Curves, steps: np.ndarray) -> np.ndarray:
            return steps.astype(float) if x == "steps" else run.wall(steps)

        grid, (low, median, high) = median_band([xs(run, run.episode_steps) for run in group],
                                                [moving_average(run.episode_returns, window) for run in group])
        if not len(grid):  # one run, or runs that share no x (wall clocks that never overlap): each its own
            label = label.replace("median, IQR", "each drawn apart, no x shared")
            for j, run in enumerate(group):
                line, bars = ((f"{label}: return, moving average of {window}",
                               f"{label}: greedy evaluation, mean ± std") if j == 0 else ("_nolegend_",) * 2)
                ax.plot(xs(run, run.episode_steps), run.episode_returns, ".", color=colour, alpha=0.15, markersize=3)
                ax.plot(xs(run, run.episode_steps), moving_average(run.episode_returns, window), color=colour,
                        label=line)
                if len(run.eval_steps):
                    ax.errorbar(xs(run, run.eval_steps), run.eval_means, yerr=run.eval_stds, fmt="o", color=colour,
                                ecolor=colour, capsize=3, markersize=4, label=bars)
        else:
            ax.plot(grid, median, color=colour, label=f"{label}: return, moving average of {window}")
            ax.fill_between(grid, low, high, color=colour, alpha=0.2)
            evals = [run for run in group if len(run.eval_steps)]
            if evals:
                steps = sorted(set.intersection(*(set(run.eval_steps.tolist()) for run in evals)))
                if steps:
                    table = np.stack([[run.eval_means[run.eval_steps.tolist().index(s)] for s in steps]
                                      for run in evals])
                    at = np.median([xs(run, np.array(steps)) for run in evals], axis=0)
                    q1, q2, q3 = np.percentile(table, [25, 50, 75], axis=0)
                    ax.errorbar(at, q2, yerr=[q2 - q1, q3 - q2], fmt="o", color=colour, capsize=3, markersize=4,
                                label=f"{label}: greedy evaluation, median and IQR")
    ax.set_xlabel("env steps" if x == "steps" else "wall-clock seconds of training")
    ax.set_ylabel("episodic return")
    ax.set_title(title or ", ".join(settings_names(runs)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out, buffer.getvalue())
    return Path(out)


def median_band(xs: list[np.ndarray], ys: list[np.ndarray], points: int = 200
                ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The 25th, 50th and 75th percentiles across runs of curves (xs[i], ys[i]), each
    interpolated on a common grid of x; at each x, over the runs whose curve reaches it,
    where at least two do (runs end, or start, at different x: a resumed run's wall
    clock may start late). Empty where no x is reached by two runs."""
    grid = np.linspace(min(x[0] for x in xs), max(x[-1] for x in xs), points)
    curves = np.stack([np.interp(grid, x, y, left=np.nan, right=np.nan) for x, y in zip(xs, ys)])
    covered = np.sum(~np.isnan(curves), axis=0) >= 2
    if not covered.any():  # one run, or no x that two runs reach: empty, not a percentile of nothing
        return grid[covered], (grid[covered],) * 3
    return grid[covered], tuple(np.nanpercentile(curves[:, covered], [25, 50, 75], axis=0))


def settings_names(runs: list[Curves]) -> list[str]:
    return sorted({json.loads(r.setting).get("env_id", r.name) if r.setting else r.name for r in runs})
