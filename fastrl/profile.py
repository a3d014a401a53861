"""Profiling for `fastrl profile`: phase times after warm-up, a verdict with the knob to
turn, and a torch.profiler trace of a few collection cycles.

The session is driven by `Run.end_cycle()`, called once per collection cycle by the
training loops: warm-up (until the compiled learner has run), timing (profile_steps
env steps with device-synchronised phase timers), tracing (trace_cycles cycles under
torch.profiler), done (the run stops). While profiling, the learner runs its stages one
by one under their own timers (`timed_learn_step`, `timed_update`).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastrl import accel
from fastrl.algos import ddqn, reinforce
from fastrl.buffer import Episodes, Transitions
from fastrl.checkpoint import writing
from fastrl.config import TrainConfig
from fastrl.nets import PolicyNetwork
from fastrl.optim import Adam
from fastrl.priorities import Priorities
from fastrl.timing import Phases

WARMUP_UPDATES = 3  # the first update compiles; time only the steady state

# Phase -> the part of the loop it belongs to.
GROUPS = {
    "env": ("env", "h2d"),
    "act": ("act",),
    "learn": ("sample", "targets", "forward_backward", "optimizer_step", "update", "target_update"),
    "ring": ("ring_write",),
    "log": ("log",),
    "eval": ("eval",),
}

KNOBS = {
    "env": "env stepping dominates: raise --num-envs so each worker's pipe round trip serves more envs "
           "(workers: --num-workers, one per core by default), --backend sync for cheap envs, "
           "or --backend envpool where EnvPool has the env",
    "learn": "learning dominates: lower --replay-ratio (fewer updates per env step), a larger --batch-size "
             "with fewer updates, keep the default --learner (compile; cudagraphs on CUDA), or a smaller --hidden",
    "act": "action selection dominates: raise --num-envs so each forward pass serves more envs",
    "ring": "ring writes dominate: raise --num-envs so each write carries more envs",
    "log": "logging dominates: raise --log-interval",
    "eval": "evaluation dominates: raise --eval-interval or lower --eval-episodes",
}


def verdict(phase_seconds: dict[str, float]) -> tuple[str, str]:
    """(the group that takes the most time, the knob that addresses it)."""
    totals = {g: sum(phase_seconds.get(p, 0.0) for p in phases) for g, phases in GROUPS.items()}
    worst = max(totals, key=totals.get)
    return worst, KNOBS[worst]


@contextlib.contextmanager
def native_stderr_muted():
    """Sends the process's stderr (file descriptor 2) to /dev/null meanwhile. Kineto (the
    profiler's C++ side) logs a line there as the profiler starts and stops, which no
    log level silences, and it would break into the progress line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def timed_learn_step(sample: Callable[[], Transitions], q: nn.Module, q_target: nn.Module, optimizer: Adam,
                     tau: float, target_update_interval: int, learner: str, phases: Phases,
                     priorities: Priorities | None = None) -> Callable[[], ddqn.UpdateStats]:
    """`ddqn.make_learn_step`'s stages (sample, targets, forward_backward, optimizer_step,
    target_update) one by one, each timed: compiled one by one, forward_backward eager,
    slower in all than the one graph. (Compiled on its own, forward_backward, with
    torch.func gradients as graph outputs, runs slower than autograd.)"""
    def compiled(fn: Callable) -> Callable:
        return accel.compile_fn(fn, learner != "eager", optimizer.device)

    sample, optimizer_step = compiled(sample), compiled(optimizer.step)
    targets = compiled(lambda batch: ddqn.double_dqn_targets(q, q_target, batch))
    priority_update = compiled(priorities.learned) if priorities is not None else None
    target_update = compiled(lambda: ddqn.update_target(
        q_target, q, ddqn.target_update_rate(tau, target_update_interval, optimizer.steps)))

    def learn_step() -> ddqn.UpdateStats:
        with phases("sample"):
            batch = sample()
        with phases("targets"):
            y = targets(batch)
        with phases("forward_backward"):
            grads, loss, q_sa = ddqn.td_gradients(q, optimizer.params, batch, y)
        if priorities is not None:
            with phases("priorities"):
                priority_update(y - q_sa, batch.weight > 0)
        with phases("optimizer_step"):
            grad_norm = optimizer_step(grads)
        with phases("target_update"):
            target_update()
        return ddqn.UpdateStats(loss, q_sa.mean(), grad_norm)

    return learn_step


def timed_update(policy: PolicyNetwork, optimizer: Adam, baseline: str, normalize_returns: bool,
                 entropy_coef: float, value_coef: float, running_mean: torch.Tensor, importance_clip: float,
                 learner: str, phases: Phases) -> Callable[[Episodes], reinforce.UpdateStats]:
    """`reinforce.make_update`'s stages, forward_backward (eager) and optimizer_step, each timed."""
    forward_backward = reinforce.make_gradients(policy, optimizer.params, baseline, normalize_returns,
                                                entropy_coef, value_coef, running_mean, importance_clip)
    optimizer_step = accel.compile_fn(optimizer.step, learner != "eager", optimizer.device)

    def update(batch: Episodes) -> reinforce.UpdateStats:
        with phases("forward_backward"):
            grads, loss, parts = forward_backward(batch)
        with phases("optimizer_step"):
            grad_norm = optimizer_step(grads)
        return reinforce.UpdateStats(loss, *parts, grad_norm)

    return update


class ProfileSession:
    def __init__(self, config: TrainConfig, device: torch.device, phases: Phases, run_dir: Path):
        self.config, self.device, self.phases, self.dir = config, device, phases, run_dir
        self.state = "warmup"
        self._start = (0.0, 0, 0)
        self._timed: dict | None = None
        self._profiler = None
        self._cycles = 0
        self._cycle_steps = self._steps_at_last_cycle = 0  # env steps per collection cycle

    def planned_steps(self) -> int:
        """Env steps the whole session takes: the progress line's total. Warm-up lasts until
        the first updates (for DDQN, learning_starts steps and a cycle or two): an estimate
        until it is over, then exact."""
        c = self.config
        if self.state == "warmup":
            return (c.learning_starts if c.algo == "ddqn" else 0) + c.profile_steps
        cycle = self._cycle_steps
        return self._start[1] + (math.ceil(c.profile_steps / cycle) + c.trace_cycles) * cycle

    @property
    def done(self) -> bool:
        return self.state == "done"

    def end_cycle(self, env_steps: int, updates: int) -> None:
        """Called once per collection cycle with the run's counters."""
        c = self.config
        self._cycle_steps, self._steps_at_last_cycle = env_steps - self._steps_at_last_cycle, env_steps
        if self.state == "warmup" and updates >= WARMUP_UPDATES:
            self.phases.reset()
            self._start = (time.perf_counter(), env_steps, updates)
            self.state = "timing"
        elif self.state == "timing" and env_steps - self._start[1] >= c.profile_steps:
            t0, steps0, updates0 = self._start
            self._timed = {"wall_s": time.perf_counter() - t0, "env_steps": env_steps - steps0,
                           "updates": updates - updates0, "phase_s": dict(self.phases.seconds)}
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            with native_stderr_muted():
                self._profiler.__enter__()
            self.state = "tracing"
        elif self.state == "tracing":
            self._cycles += 1
            if self._cycles >= c.trace_cycles:
                self._finish_trace()

    def _finish_trace(self) -> None:
        with native_stderr_muted():
            self._profiler.__exit__(None, None, None)
        trace, top_ops = self.dir / "trace.json", self.dir / "top_ops.txt"
        with writing(trace):
            self._profiler.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._profiler.key_averages().table(sort_by=sort, row_limit=15)
        with writing(top_ops):
            top_ops.write_text(table + "\n")
        self._timed.update(trace=str(trace), top_ops=table, trace_cycles=self._cycles)
        self.state = "done"

    def report(self) -> dict | None:
        if self._timed is None or self.state != "done":
            return None
        r = dict(self._timed)
        r["bottleneck"], r["knob"] = verdict(r["phase_s"])
        r["env_steps_per_s"] = r["env_steps"] / r["wall_s"]
        r["updates_per_s"] = r["updates"] / r["wall_s"]
        r["device"] = str(self.device)
        return r


def format_report(r: dict) -> str:
    wall = r["wall_s"]
    lines = [f"profile: {r['env_steps']:,} env steps, {r['updates']:,} updates in {wall:.2f} s on {r['device']} "
             f"(after warm-up)", "", f"{'phase':<18}{'seconds':>10}{'share':>9}"]
    for name, seconds in sorted(r["phase_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<18}{seconds:>10.3f}{seconds / wall:>9.1%}")
    other = wall - sum(r["phase_s"].values())
    lines.append(f"{'(untimed)':<18}{other:>10.3f}{other / wall:>9.1%}")
    lines += ["", f"env steps/s {r['env_steps_per_s']:,.0f}   updates/s {r['updates_per_s']:,.0f}",
              f"bottleneck: {r['bottleneck']} — {r['knob']}", "",
              f"top operators over {r['trace_cycles']} traced cycles:", r["top_ops"],
              f"trace (chrome://tracing or ui.perfetto.dev): {r['trace']}"]
    return "\n".join(lines)
