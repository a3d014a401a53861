"""A training run's bookkeeping, one concern per module, put together by `Run`:

  artifacts.py  the run directory: config.json, checkpoint.pt, state.pt, summary.json
  resume.py     what a resumed run starts from, and which settings it may change
  logs.py       TensorBoard and the progress line, once per log window
  evals.py      the evaluation schedule: background evaluations, stop-on-solve
  signals.py    Ctrl-C and SIGTERM: a stop at the end of the step in progress

The training loops (fastrl.training) see only `Run`: its counters (env_steps, updates),
its budget, `restore` once at the start, `end_cycle` once per collection cycle (logs,
evaluations, saved states) and `end_loop` once at the end.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, NoReturn

import torch

from fastrl import checkpoint, video
from fastrl.buffer import ReplayRing
from fastrl.collector import Collector
from fastrl.config import TrainConfig, checkpoint_every
from fastrl.envs import EnvSpec
from fastrl.errors import ConfigError, Diverged, EnvError, WorkerDied, WriteFailed
from fastrl.evaluation import BackgroundEvaluator, EvalResult
from fastrl.nets import greedy_policy
from fastrl.plot import plot
from fastrl.precompile import Precompile
from fastrl.profile import ProfileSession
from fastrl.run.artifacts import RunDir, create_run_dir, describe_failure
from fastrl.run.evals import Evaluations
from fastrl.run.logs import DeviceMeans, TrainingLog, nonfinite
from fastrl.run.signals import StopRequest
from fastrl.timing import Phases, startup_s

__all__ = ["Run", "StopRequest", "create_run_dir", "describe_failure"]


class Run:
    def __init__(self, config: TrainConfig, spec: EnvSpec, device: torch.device, run_dir: RunDir, started: float,
                 resumed: dict | None = None):
        """`started`: `time.perf_counter()` when `train()` was called; `resumed`: the saved
        state (state.pt) a resumed run continues from."""
        self.config, self.spec, self.device, self.dir = config, spec, device, run_dir
        self.resumed = resumed
        saved = resumed or {"env_steps": 0, "updates": 0, "wall_s": 0.0, "resumes": -1}
        # Started first, like the env workers: before any thread, compilation or CUDA state.
        evaluator = BackgroundEvaluator(config, spec)
        sync = torch.cuda.synchronize if config.profile and device.type == "cuda" else None
        self.phases = Phases(enabled=config.timers or config.profile, sync=sync)
        self.profiler = ProfileSession(config, device, self.phases, run_dir.path) if config.profile else None
        try:
            run_dir.write_config()
            self.log = TrainingLog(run_dir.path, config, self.profiler.planned_steps() if self.profiler
                                   else config.total_steps, resumed_at=saved["env_steps"] if resumed else None)
        except BaseException:
            evaluator.close()
            raise
        # Said first, so that TensorBoard can watch the run from its start. The first update
        # compiles, which stalls the first window's rate: the note says why. (Where this
        # machine has not compiled the step yet, `precompile` says so.)
        compiles = (" (the first update compiles it: a few seconds with a warm compile cache)"
                    if config.learner != "eager" else "")
        again = f"resumed at {saved['env_steps']:,} env steps: " if resumed else ""
        self.log.message(f"{again}{config.algo} on {config.env_id}, seed {config.seed}: {config.num_envs} envs "
                         f"({config.backend} backend), {config.learner} learner on {device}{compiles}\n"
                         f"{run_dir.where()}")
        # Installed by train() around the loop and the final evaluation.
        self.stop = StopRequest(announce=self.log.message)
        # Time to solve is what a fresh `fastrl train` process would take: its start-up
        # (interpreter, imports) plus this run, never what the process did before train()
        # (earlier runs of a sweep, an idle notebook).
        threshold = config.solve_threshold if not math.isnan(config.solve_threshold) else spec.reward_threshold
        # A resumed run's clocks go on from the saved run's.
        self.evals = Evaluations(config, threshold, evaluator, self.log, give_up=lambda: self.stop.requested,
                                 solve_clock0=started - startup_s() - saved["wall_s"], on_result=self._evaluated)
        self.env_steps = saved["env_steps"]
        self.updates = saved["updates"]
        self.resumes = saved["resumes"] + 1
        self.model: torch.nn.Module | None = None
        self.storage: ReplayRing | None = None
        self.diverged = False
        self._t0 = time.perf_counter() - saved["wall_s"]
        self._checkpoint_every = None if config.profile else checkpoint_every(config.checkpoint_interval)
        self._checkpoint_last = {"steps": self.env_steps, "seconds": saved["wall_s"]}
        self.state_saves = {"count": 0, "bytes": 0, "seconds": 0.0}  # what saving state.pt cost
        self.precompiling: Precompile | None = None

    def precompile(self, groups: int, storage_bytes: int) -> Precompile | None:
        """Starts compiling the learner step in another process where this machine has not
        compiled it yet (see fastrl.precompile): the switch for the learner's update, which
        runs eagerly meanwhile. None where the step compiles in this process."""
        if Precompile.needed(self.config, self.spec, self.device, groups, storage_bytes):
            try:
                self.precompiling = Precompile(self.config, self.spec, groups, self.log.message)
            except OSError:  # no process could be started (a process limit): compiled here then
                return None
            self.log.message("this machine has not compiled this learner step yet: another process compiles it, "
                             "and updates run eagerly until it is ready")
        return self.precompiling

    def watch(self, model: torch.nn.Module, storage: ReplayRing) -> None:
        """The network to checkpoint and to evaluate greedily (argmax of its outputs), and
        the storage it learns from (looked at if training diverges)."""
        self.model, self.storage = model, storage

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._t0

    def budget_left(self) -> bool:
        """False once the env-step or wall-clock budget is spent, the env is solved (with
        stop-on-solve), a profile is complete or a stop is requested."""
        c = self.config
        if self.stop.requested or self.evals.stopping or (self.profiler is not None and self.profiler.done):
            return False
        return self.env_steps < c.total_steps and not (0 < c.time_limit_s <= self.wall_s)

    @property
    def reset_seed(self) -> int:
        """The seed the envs are reset with: the config's, and another for each resume (the
        episodes in progress when the run stopped start again, on new seeds)."""
        return self.config.seed + 1_000_003 * self.resumes

    def restore(self, collector: Collector) -> dict | None:
        """For a resumed run, restores the run's own state (counters, evaluations, the
        random-number generators, the episode count) and returns what the loop saved (see
        save_state) for it to restore its own; None for a new run. Called once the loop
        has built and `watch`ed its network, and has reset the envs."""
        s = self.resumed
        if s is None:
            return None
        collector.episodes, collector.env_steps = s["episodes"], self.env_steps
        self.log.recent_returns.extend(s["recent_returns"])
        self.evals.load_state_dict(s["evals"], self.model)
        torch.set_rng_state(s["rng"]["cpu"])
        if self.device.type == "cuda" and s["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(s["rng"]["cuda"], self.device)
        return s["loop"]

    def checkpoint_due(self) -> bool:
        """True every `checkpoint_interval` (seconds or env steps) since the last save_state."""
        if self._checkpoint_every is None:
            return False
        kind, every = self._checkpoint_every
        now = self.env_steps if kind == "steps" else self.wall_s
        return now - self._checkpoint_last[kind] >= every

    def save_state(self, collector: Collector, loop: dict) -> None:
        """Saves everything a resumed run continues from to state.pt: `loop`, the loop's own
        state (networks, optimizer, storage, its counters; CPU tensors or plain values),
        and the run's. Called at the end of a cycle, when no step is half done."""
        if self.config.profile:
            return
        with self.phases("checkpoint"):
            t0 = time.perf_counter()
            self._check_weights()  # a diverged run's state is never saved
            self.log.writer.flush()  # the curves up to here survive a kill -9, as the state does
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            state = {"format": checkpoint.STATE_FORMAT, "config": self.config.to_dict(), "env_steps": self.env_steps,
                     "updates": self.updates, "wall_s": self.wall_s, "resumes": self.resumes,
                     "episodes": collector.episodes, "recent_returns": list(self.log.recent_returns),
                     "evals": self.evals.state_dict(), "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
                     "loop": loop}
            size = self.dir.save_state(state)
            self.state_saves["count"] += 1
            self.state_saves["bytes"] = size
            self.state_saves["seconds"] += time.perf_counter() - t0
        self._checkpoint_last = {"steps": self.env_steps, "seconds": self.wall_s}

    def end_cycle(self, collector: Collector, learner_stats: DeviceMeans, scalars: dict[str, float],
                  state: Callable[[], dict]) -> bool:
        """Called at the end of each collection cycle, when no step is half done: writes the
        log window when one is due, runs the evaluation schedule, saves the loop's `state()`
        (see save_state) every checkpoint_interval, and drives a profiling session. True
        when training should stop (solved)."""
        saving = self.checkpoint_due()
        if saving or self.log_due():  # a saved state ends a log window: the curves reach it
            self.write_log(collector, learner_stats, scalars)
        if self.eval_due() and self.evaluate():
            return True
        if saving:
            self.save_state(collector, state())
        self._profile_cycle()
        return False

    def end_loop(self, collector: Collector, learner_stats: DeviceMeans, scalars: dict[str, float],
                 state: Callable[[], dict]) -> None:
        """After the loop, however it ended: the last log window, however short, and the
        state a resumed run goes on from."""
        self.write_log(collector, learner_stats, scalars)
        self.save_state(collector, state())

    def _profile_cycle(self) -> None:
        if self.profiler is not None:
            warming_up = self.profiler.state == "warmup"
            self.profiler.end_cycle(self.env_steps, self.updates)
            if warming_up and self.profiler.state != "warmup":  # the planned steps are exact from now on
                self.log.progress.total = self.profiler.planned_steps()

    def log_due(self) -> bool:
        return self.log.due(self.env_steps, self.updates, self.wall_s)

    def write_log(self, collector: Collector, learner_stats: DeviceMeans, scalars: dict[str, float]) -> None:
        """Writes the log window (see TrainingLog.write) with the learner's means: the one
        host sync of the learner statistics is here. The loops call it once more when they
        end, so the last window, however short, is not lost."""
        with self.phases("log"):
            stats = learner_stats.read()
            returns, lengths, ends = collector.pop_episodes()
            last_eval = self.evals.last.mean if self.evals.last else None
            self.log.write(self.env_steps, self.updates, self.wall_s, (returns, lengths, ends, collector.episodes),
                           {**stats, **scalars}, self.phases.seconds, last_eval)
        bad = nonfinite(stats)
        if bad:  # written first: the curves show where it happened
            self._diverged(", ".join(bad))

    def eval_due(self) -> bool:
        return self.evals.due(self.env_steps)

    def evaluate(self) -> bool:
        """Collects a finished evaluation and, when one is due, submits the current weights
        and saves them as the checkpoint; True when training should stop (solved)."""
        with self.phases("eval"):
            self.evals.collect_finished()
            if self.evals.start_due(self.env_steps):
                self._check_weights()
                self.evals.submit(self.model, self.env_steps, self.updates, screen=self.config.stop_on_solve)
        return self.evals.stopping

    def _evaluated(self, weights: dict, env_steps: int, updates: int, result: EvalResult) -> None:
        """Each evaluation's weights become the checkpoint, with its result: checkpoint.pt
        always holds weights whose evaluation the summary can report."""
        if not self.diverged:
            self.dir.save_checkpoint(weights, env_steps, updates, result)

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

    # --- the end -------------------------------------------------------------------------
    def _weights_at(self) -> tuple[int, int]:
        """(env steps, updates) after which the model held its current weights."""
        return self.evals.rolled_back_to or (self.env_steps, self.updates)

    def save_checkpoint(self) -> str:
        """Saves the current weights, not evaluated (when no evaluation ever ran)."""
        self._check_weights()  # never overwrites the last good weights
        return self.dir.save_checkpoint(self.model.state_dict(), *self._weights_at(), None)

    def _final_evaluation(self) -> None:
        """Collects the evaluation in flight (its result belongs in the log) and, unless
        the current weights had a full one, evaluates them."""
        evals = self.evals
        if evals.in_flight:
            evals.collect()
        if evals.last_full_at != self._weights_at()[0]:
            self._check_weights()
            evals.submit(self.model, *self._weights_at(), screen=False)
            evals.collect()

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
        self.log.close()
        if self.precompiling is not None:  # a run that ended first: the final evaluation gets the CPU
            self.precompiling.close()
        loop_failed = error is not None
        failures: list[Exception] = []  # raised once the rest is written: the first one
        try:
            if self.model is not None and not self.stop.requested and error is None and not self.config.profile:
                with self.phases("eval"):
                    self._final_evaluation()
        except KeyboardInterrupt:  # a stop request gave up the wait, or a signal came while none was installed
            self.stop.requested = self.stop.forced = True
        except (WorkerDied, WriteFailed, EnvError, Diverged) as exc:
            # SIGTERM to the whole process group kills the evaluation process with the stop: no error.
            if not (self.stop.requested and isinstance(exc, WorkerDied)):
                failures.append(exc)
                error = error or describe_failure(exc)
        finally:
            self.evals.close(terminate=self.stop.forced)

        def attempt(write: Callable[[], Any]) -> Any:
            """Each of the last writes is tried though one before it failed (a full disk), or
            the checkpoint found its weights not finite (after a stop: no final evaluation
            checked them)."""
            try:
                return write()
            except (WriteFailed, Diverged) as exc:
                failures.append(exc)

        interrupted = self.stop.requested
        # After a stop (no final evaluation) the checkpoint stays the last evaluated weights,
        # so that the summary's final evaluation describes it; the newest weights are in
        # state.pt, for --resume. Before any evaluation, the current weights are saved.
        if self.dir.saved_checkpoint() is None and self.model is not None and not self.diverged:
            attempt(self.save_checkpoint)
        attempt(self.log.writer.close)
        summary = self._summary(error or (str(failures[0]) if failures else None), interrupted)
        summary["curves"] = None if self.config.profile else self._draw_curves()
        summary["video"] = None
        if self.config.video and self.model is not None and not interrupted and summary["error"] is None:
            summary["video"] = self._record_video()
        attempt(lambda: self.dir.write_summary(summary))
        self._print_summary(summary, also_failed=failures if loop_failed else [])
        if failures and not loop_failed:
            raise failures[0]
        return summary

    def _draw_curves(self) -> str | None:
        """curves.png in the run dir (see fastrl.plot); a run that cannot draw them (no
        episode ended, a full disk) says why and goes on."""
        try:
            return str(plot([self.dir.path], self.dir.path / "curves.png"))
        except ConfigError:  # nothing to draw yet
            return None
        except Exception as exc:  # a plot is not worth a failed run
            self.log.message(f"fastrl: warning: no curves.png: {exc}")
            return None

    def _record_video(self) -> str | None:
        """video.mp4 in the run dir: one greedy episode of the final weights (see fastrl.video);
        a run that cannot record it says why and goes on."""
        try:
            return video.record(self.dir.path / "video.mp4", self.config, greedy_policy(self.model), episodes=1,
                                seed=self.config.seed, device=self.device).path
        except Exception as exc:  # a video is not worth a failed run
            self.log.message(f"fastrl: warning: no video.mp4: {exc}")
            return None

    def _summary(self, error: str | None, interrupted: bool) -> dict:
        evals, last, wall = self.evals, self.evals.last, self.wall_s
        ckpt = self.dir.saved_checkpoint()
        ckpt_meta = self.dir.checkpoint_meta() if ckpt else {}
        return {
            "env_id": self.config.env_id,
            "algo": self.config.algo,
            "seed": self.config.seed,
            "solved": evals.solved,
            "solve_threshold": None if math.isnan(evals.threshold) else evals.threshold,
            "solve_wall_s": evals.solve_wall_s,
            "solve_env_steps": evals.solve_env_steps,
            "final_eval_mean": last.mean if last else None,
            "final_eval_std": last.std if last else None,
            "final_eval_episodes": last.episodes if last else 0,
            # The env steps of the weights that evaluation measured: the checkpoint's.
            "final_eval_env_steps": ckpt_meta.get("env_steps") if last else None,
            "best_eval_mean": evals.best_mean,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "wall_s": wall,
            "env_steps_per_s": self.env_steps / wall if wall > 0 else 0.0,
            "phase_s": dict(self.phases.seconds),
            "profile": self.profiler.report() if self.profiler is not None else None,
            "interrupted": interrupted,
            "error": error,
            "checkpoint": ckpt,
            "checkpoint_env_steps": ckpt_meta.get("env_steps"),
            "state": self.dir.saved_state(),
            "state_saves": dict(self.state_saves),
            # Where the learner step was compiled in another process while the run learned eagerly.
            "background_compile": self.precompiling.summary() if self.precompiling is not None else None,
            "resumes": self.resumes,
            "run_dir": str(self.dir.path),
        }

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
                         f"over {s['final_eval_episodes']} episodes, of the weights after "
                         f"{s['final_eval_env_steps']:,} env steps (checkpoint.pt)")
        if s["solved"]:
            lines.append(f"solved after {s['solve_env_steps']:,} env steps, {s['solve_wall_s']:.1f} s "
                         f"(start-up included)")
        elif s["solve_threshold"] is not None:
            lines.append(f"not solved (threshold {s['solve_threshold']:g})")
        if s["curves"]:
            lines.append(f"curves: {s['curves']}")
        if s["video"]:
            lines.append(f"video: {s['video']}")
        if s["interrupted"] and s["state"]:
            lines.append(f"go on with: fastrl train --resume {s['run_dir']}")
        lines.append(self.dir.where())
        print("\n".join(lines), flush=True)

