"""Bookkeeping shared by every training loop: run directory, TensorBoard, progress
line, periodic evaluation with stop-on-solve, checkpoints and summary.json."""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from fastrl import checkpoint
from fastrl.buffer import ReplayRing
from fastrl.checkpoint import WriteFailed
from fastrl.collector import Collector
from fastrl.config import ConfigError, TrainConfig
from fastrl.envs import EnvError, EnvSpec, WorkerDied
from fastrl.evaluate import BackgroundEvaluator, EvalResult
from fastrl.metrics import DeviceMeans, Progress, Writer
from fastrl.profile import ProfileSession
from fastrl.timing import Phases, startup_s


def default_run_dir(config: TrainConfig) -> str:
    """runs/<env>__<algo>__<seed>__<time>, one level deep: the env id without the module
    that registers it ("my_envs:") and with its namespace joined on ("ALE/Pong-v5" -> ALE-Pong-v5)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = config.env_id.rpartition(":")[2].replace("/", "-")
    return str(Path("runs") / f"{env}__{config.algo}__{config.seed}__{stamp}")


def create_run_dir(config: TrainConfig) -> Path:
    """Creates the run directory; an unusable path, or one that holds a run already (whose
    checkpoint and curves a new run would overwrite or mix with: its config.json, written
    once the run has started), is a ConfigError. Called before any worker process starts:
    a bad path leaves nothing running."""
    path = Path(config.run_dir or default_run_dir(config))
    if (path / "config.json").exists():
        raise ConfigError(f"invalid run_dir={str(path)!r}: it holds a run already (config.json); "
                          f"pass a new --run-dir")
    return checkpoint.make_dir(path, "run_dir")


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


class Diverged(RuntimeError):
    """Training produced a nan or an infinity: in a learner statistic (read when logged)
    or in the network's weights (checked before each evaluation and checkpoint). The
    message says whether the env gave non-finite observations or rewards (still in the
    ring) or the learner itself diverged. The run saves no weights from then on: its
    checkpoint keeps those of the evaluation before."""


def describe_failure(exc: Exception) -> str:
    """What summary.json keeps of the error that ended a run (call it where it is handled):
    for an env's error, the env's own traceback, from the process that ran it."""
    return exc.trace if isinstance(exc, EnvError) and exc.trace else traceback.format_exc(limit=3)


class Run:
    def __init__(self, config: TrainConfig, spec: EnvSpec, device: torch.device, run_dir: Path, started: float):
        """`started`: `time.perf_counter()` when `train()` was called."""
        self.config, self.spec, self.device, self.dir = config, spec, device, run_dir
        # Started first, like the env workers: before any thread, compilation or CUDA state.
        self._evals = BackgroundEvaluator(config, spec)
        try:
            checkpoint.save_json(self.dir / "config.json", config.to_dict())
            self.writer = Writer(str(self.dir))
            self.writer.config(config.to_dict())
        except BaseException:
            self._evals.close()
            if hasattr(self, "writer"):
                with contextlib.suppress(WriteFailed):
                    self.writer.close()
            raise
        sync = torch.cuda.synchronize if config.profile and device.type == "cuda" else None
        self.phases = Phases(enabled=config.timers or config.profile, sync=sync)
        self.profiler = ProfileSession(self) if config.profile else None
        self.progress = Progress(self.profiler.planned_steps() if self.profiler else config.total_steps,
                                 config.progress)
        # Said first, so that TensorBoard can watch the run from its start. The first update
        # compiles, which stalls the first window's rate: the note says why.
        compiles = (" (the first update compiles it: a few seconds, up to ~25 s with a cold cache)"
                    if config.learner != "eager" else "")
        self.progress.message(f"{config.algo} on {config.env_id}, seed {config.seed}: {config.num_envs} envs "
                              f"({config.backend} backend), {config.learner} learner on {device}{compiles}\n"
                              f"{self._where()}")
        self.threshold = (config.solve_threshold if not math.isnan(config.solve_threshold)
                          else spec.reward_threshold)
        # Installed by train() around the loop and the final evaluation.
        self.stop = StopRequest(announce=self.progress.message)
        self.env_steps = 0
        self.updates = 0
        self.solved = False
        self.solve_wall_s: float | None = None
        # Time to solve is what a fresh `fastrl train` process would take: its start-up
        # (interpreter, imports) plus this run, never what the process did before train()
        # (earlier runs of a sweep, an idle notebook).
        self._solve_clock0 = started - startup_s()
        self.solve_env_steps: int | None = None
        self.last_eval: EvalResult | None = None
        self.best_eval_mean: float | None = None  # over full-size evaluations
        self._last_eval_full_at: int | None = None  # the env steps of the weights it evaluated
        self._evaluating: tuple[tuple, dict] | None = None  # ((env steps, updates), weights) in flight
        self._rolled_back_to: tuple[int, int] | None = None  # the model's (env steps, updates), once rolled back
        self.recent_returns: deque = deque(maxlen=100)
        self.model: torch.nn.Module | None = None
        self.storage: ReplayRing | None = None
        self.diverged = False
        self._next_eval = config.eval_interval if config.eval_interval > 0 else math.inf
        self._t0 = time.perf_counter()
        self._last_log: tuple | None = None  # (time, env_steps, updates) at the last log

    def watch(self, model: torch.nn.Module, storage: ReplayRing) -> None:
        """The network to checkpoint and to evaluate greedily (argmax of its outputs), and
        the storage it learns from (looked at if training diverges)."""
        self.model, self.storage = model, storage

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._t0

    def budget_left(self) -> bool:
        """False once the env-step or wall-clock budget is spent, a profile is complete or
        a stop is requested."""
        c = self.config
        if self.stop.requested or (self.profiler is not None and self.profiler.done):
            return False
        return self.env_steps < c.total_steps and not (0 < c.time_limit_s <= self.wall_s)

    def end_cycle(self) -> None:
        """Called once per collection cycle: drives a profiling session, if any."""
        if self.profiler is not None:
            self.profiler.end_cycle()

    # --- logging -------------------------------------------------------------------------
    def log_due(self) -> bool:
        now = time.perf_counter()
        if self._last_log is None:  # the first window opens at the first step, after start-up
            self._last_log = (now, self.env_steps, self.updates)
        return now - self._last_log[0] >= self.config.log_interval

    def log(self, collector: Collector, learner_stats: DeviceMeans, scalars: dict[str, float]) -> None:
        """Writes throughput, episode statistics, learner means, `scalars` and phase times;
        redraws the progress line. The one host sync of the learner statistics is here.
        The loops call it once more when they end, so the last window, however short, is
        not lost; a window without an env step writes nothing."""
        if self._last_log is None or self.env_steps == self._last_log[1]:
            return
        with self.phases("log"):
            stats = learner_stats.read()
            scalars = {**stats, **scalars}
            now = time.perf_counter()
            t_prev, steps_prev, updates_prev = self._last_log
            dt = max(now - t_prev, 1e-9)
            sps = (self.env_steps - steps_prev) / dt
            ups = (self.updates - updates_prev) / dt
            self._last_log = (now, self.env_steps, self.updates)
            returns, lengths = collector.pop_episodes()
            self.recent_returns.extend(returns)
            out = {"charts/sps": sps, "charts/updates_per_s": ups, **scalars}
            if returns:
                out["charts/episodic_return"] = sum(returns) / len(returns)
                out["charts/episodic_length"] = sum(lengths) / len(lengths)
                out["charts/episodes"] = collector.episodes
            for name, seconds in self.phases.seconds.items():
                out[f"time/{name}_s"] = seconds
            self.writer.scalars(out, self.env_steps)
            recent = sum(self.recent_returns) / len(self.recent_returns) if self.recent_returns else None
            self.progress.update(self.env_steps, self.wall_s, sps, ups, recent,
                                 self.last_eval.mean if self.last_eval else None)
        nonfinite = [f"{name} is {value}" for name, value in stats.items() if not math.isfinite(value)]
        if nonfinite:  # written first: the curves show where it happened
            self._diverged(", ".join(nonfinite))

    # --- divergence ----------------------------------------------------------------------
    def _check_weights(self) -> None:
        """Raises Diverged if the weights hold a nan or an infinity."""
        if not checkpoint.all_finite(self.model.state_dict()):
            self._diverged("the network's weights are no longer finite")

    def _diverged(self, what: str) -> NoReturn:
        """Raises Diverged. The weights are never saved from now on: finite or not, they
        learned from what diverged, and the last checkpoint has better ones."""
        self.diverged = True
        fields = self.storage.nonfinite_fields() if self.storage is not None else []
        if fields:
            names = " and ".join({"obs": "observations"}.get(f, f) for f in fields)
            cause = (f"the env gave non-finite {names} (nan or inf, still in the ring): "
                     f"make the env's observations and rewards finite")
        else:
            cause = ("the env's observations and rewards in the ring are all finite, so the learner "
                     "itself diverged: lower --lr")
        raise Diverged(f"training diverged at {self.env_steps:,} env steps: {what}; {cause}")

    # --- evaluation ----------------------------------------------------------------------
    def eval_due(self) -> bool:
        """An evaluation is due, or the one in flight has finished."""
        return self.env_steps >= self._next_eval or self._evals.ready()

    def evaluate(self) -> bool:
        """Periodic greedy evaluation and checkpoint; True when training should stop (solved).

        Evaluations run in their own process on a copy of the weights while training goes
        on: this collects a finished one and, when one is due, submits the current weights
        (waiting first for an evaluation still in flight, so that every due evaluation runs,
        in order: the same evaluations as in the trainer). Once one solves with
        stop-on-solve, the model rolls back to the weights it evaluated.

        With stop-on-solve, a first round of one episode per eval env screens out
        clearly unsolved policies; only a full `eval_episodes` mean can count as solved.
        """
        c = self.config
        with self.phases("eval"):
            if self._evals.ready():
                self._collect_evaluation()
            if self.env_steps >= self._next_eval and not self._stopping():
                self._next_eval = self.env_steps + c.eval_interval
                if self._evals.in_flight:
                    self._collect_evaluation()
                if not self._stopping():
                    self._submit_evaluation(screen=c.stop_on_solve)
                    self.save_checkpoint()
        return self._stopping()

    def _stopping(self) -> bool:
        return self.solved and self.config.stop_on_solve

    def _submit_evaluation(self, screen: bool) -> None:
        self._check_weights()
        screen_below = self.threshold if screen and not math.isnan(self.threshold) else math.nan
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._evals.submit(weights, self.config.eval_episodes, screen_below)
        self._evaluating = ((self.env_steps, self.updates), weights)

    def _collect_evaluation(self) -> None:
        """Waits for the evaluation in flight; logs it and checks it for a solve."""
        ((steps, updates), weights), self._evaluating = self._evaluating, None
        result = self._evals.result(give_up=lambda: self.stop.requested)
        self.last_eval = result
        full = result.episodes == self.config.eval_episodes
        if full:
            self._last_eval_full_at = steps
            self.best_eval_mean = max(result.mean, self.best_eval_mean or -math.inf)
        self.writer.scalars({"eval/return_mean": result.mean, "eval/return_std": result.std,
                             "eval/episodes": result.episodes}, steps)
        self.writer.flush()
        note = "" if full else f" (screened after {result.episodes})"
        self.progress.message(f"eval @ {steps:,} steps: {result.mean:.1f} ± {result.std:.1f} "
                              f"over {result.episodes} episodes{note}")
        if full and not self.solved and not math.isnan(self.threshold) and result.mean >= self.threshold:
            self.solved = True
            self.solve_wall_s = time.perf_counter() - self._solve_clock0
            self.solve_env_steps = steps
            self.progress.message(f"solved: {result.mean:.1f} >= {self.threshold:g} after "
                                  f"{steps:,} env steps, {self.solve_wall_s:.1f} s")
            if self.config.stop_on_solve:
                self.model.load_state_dict(weights)  # the policy that solved, not the one trained since
                self._rolled_back_to = (steps, updates)

    # --- the end -------------------------------------------------------------------------
    def _weights_at(self) -> tuple[int, int]:
        """(env steps, updates) after which the model held its current weights."""
        return self._rolled_back_to or (self.env_steps, self.updates)

    def save_checkpoint(self) -> str:
        self._check_weights()  # never overwrites the last good weights
        path = self.dir / "checkpoint.pt"
        env_steps, updates = self._weights_at()
        checkpoint.save(path, self.config.to_dict(), self.model,
                        meta={"env_steps": env_steps, "updates": updates,
                              "obs_shape": list(self.spec.obs_shape), "n_actions": self.spec.n_actions})
        return str(path)

    def finish(self, error: str | None = None) -> dict:
        """Final evaluation (unless the loop stopped on request or failed), checkpoint,
        summary.json; returns the summary. A stop requested meanwhile abandons the final
        evaluation, and the summary says the run was interrupted. If the evaluation process
        dies meanwhile (WorkerDied), a write fails (WriteFailed: a full disk) or the weights
        are not finite (Diverged: no weights are saved), the rest is still written, with the
        error in the summary, and then that error raised.

        `error`: how the loop failed (see describe_failure), which its caller raises once
        this returns. That is the error to report: a write that fails here as well (the
        disk that filled up is often why) is only printed with the summary."""
        self.progress.close()
        loop_failed = error is not None
        failures: list[Exception] = []  # raised once the rest is written: the first one
        try:
            if self.model is not None and not self.stop.requested and error is None and not self.config.profile:
                with self.phases("eval"):
                    if self._evals.in_flight:  # its result belongs in the log
                        self._collect_evaluation()
                    if self._last_eval_full_at != self._weights_at()[0]:  # no full evaluation of these weights
                        self._submit_evaluation(screen=False)
                        self._collect_evaluation()
        except KeyboardInterrupt:  # a stop request gave up the wait, or a signal came while none was installed
            self.stop.requested = True
        except (WorkerDied, WriteFailed, EnvError, Diverged) as exc:
            # SIGTERM to the whole process group kills the evaluation process with the stop: no error.
            if not (self.stop.requested and isinstance(exc, WorkerDied)):
                failures.append(exc)
                error = error or describe_failure(exc)
        finally:
            self._evals.close()

        def attempt(write: Callable[[], Any]) -> Any:
            """Each of the last writes is tried though one before it failed (a full disk), or
            the checkpoint found its weights not finite (after a stop: no final evaluation
            checked them)."""
            try:
                return write()
            except (WriteFailed, Diverged) as exc:
                failures.append(exc)

        interrupted = self.stop.requested
        ckpt = attempt(self.save_checkpoint) if self.model is not None and not self.diverged else None
        if ckpt is None and (self.dir / "checkpoint.pt").exists():  # an earlier one (its meta says when)
            ckpt = str(self.dir / "checkpoint.pt")
        error = error or (str(failures[0]) if failures else None)
        wall = self.wall_s
        summary = {
            "env_id": self.config.env_id,
            "algo": self.config.algo,
            "seed": self.config.seed,
            "solved": self.solved,
            "solve_threshold": None if math.isnan(self.threshold) else self.threshold,
            "solve_wall_s": self.solve_wall_s,
            "solve_env_steps": self.solve_env_steps,
            "final_eval_mean": self.last_eval.mean if self.last_eval else None,
            "final_eval_std": self.last_eval.std if self.last_eval else None,
            "final_eval_episodes": self.last_eval.episodes if self.last_eval else 0,
            "best_eval_mean": self.best_eval_mean,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "wall_s": wall,
            "env_steps_per_s": self.env_steps / wall if wall > 0 else 0.0,
            "phase_s": dict(self.phases.seconds),
            "profile": self.profiler.report() if self.profiler is not None else None,
            "interrupted": interrupted,
            "error": error,
            "checkpoint": ckpt,
            "run_dir": str(self.dir),
        }
        attempt(lambda: checkpoint.save_json(self.dir / "summary.json", summary))
        attempt(self.writer.close)
        self._print_summary(summary, also_failed=failures if loop_failed else [])
        if failures and not loop_failed:
            raise failures[0]
        return summary

    def _print_summary(self, s: dict, also_failed: list[Exception]) -> None:
        status = "interrupted" if s["interrupted"] else ("failed" if s["error"] else "done")
        lines = [f"{status}: {s['env_steps']:,} env steps, {s['updates']:,} updates in {s['wall_s']:.1f} s "
                 f"({s['env_steps_per_s']:,.0f} env steps/s)"]
        lines += [f"also failed: {exc}" for exc in also_failed]
        if self.config.profile:
            lines.append(f"run dir: {s['run_dir']}")
            print("\n".join(lines), flush=True)
            return
        if s["final_eval_mean"] is not None:
            lines.append(f"final eval: {s['final_eval_mean']:.1f} ± {s['final_eval_std']:.1f} "
                         f"over {s['final_eval_episodes']} episodes")
        if s["solved"]:
            lines.append(f"solved after {s['solve_env_steps']:,} env steps, {s['solve_wall_s']:.1f} s "
                         f"(start-up included)")
        elif s["solve_threshold"] is not None:
            lines.append(f"not solved (threshold {s['solve_threshold']:g})")
        lines.append(self._where())
        print("\n".join(lines), flush=True)

    def _where(self) -> str:
        return f"run dir: {self.dir}  (tensorboard --logdir {self.dir.parent})"
