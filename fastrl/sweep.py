"""`fastrl sweep`: a grid of settings x seeds, each trial a normal `fastrl train` run dir.

    fastrl sweep --seeds 0-4 --set lr=5e-4,1e-3 --set batch_size=128,256 [train options] [--out DIR]
    fastrl sweep ... --ray [ADDRESS]          each trial a Ray task on a cluster
    fastrl sweep --resume DIR                 go on with a stopped sweep

Each trial is a `fastrl train` process: here, several at once, as many as the cores hold
without sharing one (`config.busy_cores`); with Ray, one task per trial with that many CPUs
(and `--gpus-per-trial`), placed by Ray. A trial whose process dies (killed, its node
lost, a worker died) is started again from its last saved state (`--resume`), up to
`--retries` times. The sweep keeps its plan in sweep.json and each trial's outcome in its
run dir, so `--resume` skips the finished trials and resumes the others. At the end, and
after every trial, it writes results.txt and results.json (per trial, then per setting:
solved count, median and range of time and env steps to solve, final evaluation); at
the end, curves.png (each setting's median curve over its seeds).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastrl.checkpoint import atomic_write
from fastrl.config import TrainConfig, busy_cores
from fastrl.errors import ConfigError
from fastrl.system import cpu_capacity

SWEEP_FILE = "sweep.json"
STOP_GRACE_S = 60.0  # a stopped sweep waits this long for its trials to save, then ends them
PROGRESS_S = 60.0  # a progress line when no trial has ended for this long
EXIT_CONFIG_ERROR = 2  # fastrl train's exit code for a bad setting: retrying cannot help
TASK_LOST = -1000  # the "exit code" of a trial whose Ray task died (its node or its Ray worker lost)


def parse_seeds(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "1,5,9" -> [1, 5, 9]; both may mix: "0-2,7"."""
    seeds = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        except ValueError:
            raise ConfigError(f"invalid --seeds={text!r}: must be seeds and ranges, e.g. 0-9 or 0,3,7") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"invalid --seeds={text!r}: must name distinct seeds >= 0, e.g. 0-9 or 0,3,7")
    return seeds


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["lr=5e-4,1e-3", "hidden=64 64,128 128"] -> {"lr": ["5e-4", "1e-3"], "hidden": ["64 64", "128 128"]}:
    each value as the command line writes it (a value of several words: a tuple option)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"invalid --set {item!r}: must be NAME=V1,V2,... (e.g. lr=5e-4,1e-3)")
        if name not in names or name in ("seed", "run_dir"):
            what = "set by the sweep itself" if name in ("seed", "run_dir") else "not a train option"
            raise ConfigError(f"invalid --set {item!r}: {name!r} is {what}")
        if name in grid:
            raise ConfigError(f"invalid --set {item!r}: {name} is already set")
        grid[name] = [v.strip() for v in values.split(",")]
    return grid


def setting_args(setting: dict[str, str]) -> list[str]:
    """A setting's `fastrl train` options: {"lr": "1e-3", "hidden": "64 64"} -> --lr 1e-3 --hidden 64 64."""
    args = []
    for name, value in setting.items():
        option = "--" + name.replace("_", "-")
        if value.lower() in ("true", "false") and TrainConfig.__dataclass_fields__[name].type == "bool":
            args.append(option if value.lower() == "true" else "--no-" + option[2:])
        else:
            args += [option, *value.split()]
    return args


def setting_name(setting: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "default"


@dataclass
class Trial:
    setting: dict
    seed: int
    run_dir: Path
    log: Path
    attempts: int = 0  # processes started for it by this sweep process (bounded by its retries)
    returncode: int | None = None

    @property
    def name(self) -> str:
        return f"{setting_name(self.setting)} seed={self.seed}"

    def command(self, base_args: list[str]) -> list[str]:
        """This attempt's `fastrl train` arguments: resumed from its saved state, if it has one."""
        if (self.run_dir / "state.pt").exists():
            return ["train", "--resume", str(self.run_dir), "--no-progress"]
        if self.run_dir.exists():  # an attempt that died before saving anything: start again, keep its files
            self.run_dir.rename(self.run_dir.with_name(f"{self.run_dir.name}.lost{self.processes()}"))
        return ["train", *base_args, *setting_args(self.setting), "--seed", str(self.seed),
                "--run-dir", str(self.run_dir), "--no-progress"]

    def processes(self) -> int:
        """`fastrl train` processes started for it, by every sweep process (its log says)."""
        try:
            with open(self.log, "rb") as log:
                return sum(line.startswith(b"=== fastrl") for line in log)
        except FileNotFoundError:
            return 0

    def summary(self) -> dict | None:
        try:
            return json.loads((self.run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def finished(self) -> bool:
        """Its run ended on its own (solved, or its budget spent), not stopped or failed."""
        s = self.summary()
        return s is not None and not s["interrupted"] and s["error"] is None


def make_trials(out: Path, grid: dict[str, list[str]], seeds: list[int]) -> list[Trial]:
    trials = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        folder = setting_name(setting).replace(" ", ",").replace("/", "_")
        for seed in seeds:
            log = out / "logs" / f"{folder}__seed{seed}.log"
            trials.append(Trial(setting, seed, out / folder / f"seed{seed}", log))
    return trials


def run_trial(args: list[str], log: str) -> int:
    """Runs `fastrl <args>` to its end, its output appended to `log`; returns its exit code.
    Where Ray runs it, as a task, a cancelled task stops the run as Ctrl-C does (it saves),
    and the run dies with the task's process (Linux), never left running unseen."""
    proc = start_trial(args, log, _die_with_parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def start_trial(args: list[str], log: str | Path, preexec_fn=None) -> subprocess.Popen:
    """Starts `fastrl <args>`, its output appended to `log` under a "=== fastrl ..." line
    (`Trial.processes` counts them)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== fastrl {' '.join(args)}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "fastrl", *args], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec_fn)


def _die_with_parent() -> None:
    # A trial whose sweep or Ray worker dies (killed, its node lost) would otherwise train
    # on, unseen, beside the retry or the resumed sweep that writes the same run dir.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalTrials:
    """Trials as processes on this machine, `slots` at a time."""

    def __init__(self, slots: int):
        self.slots = slots
        self.running: dict = {}  # Popen -> Trial

    def start(self, trial: Trial, args: list[str]) -> None:
        self.running[start_trial(args, trial.log, _die_with_parent)] = trial

    def wait(self, timeout: float) -> list[tuple[Trial, int]]:
        """The trials whose process ended, with its exit code; [] if none did in `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            done = [(proc, proc.poll()) for proc in self.running if proc.poll() is not None]
            if done or time.monotonic() > deadline:
                return [(self.running.pop(proc), code) for proc, code in done]
            time.sleep(0.2)

    def stop(self) -> list[tuple[Trial, int]]:
        """Asks every running trial to stop and save (SIGINT), waits for them, ends the late ones."""
        for proc in self.running:
            proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        out = []
        for proc, trial in self.running.items():
            try:
                out.append((trial, proc.wait(max(0.0, deadline - time.monotonic()))))
            except subprocess.TimeoutExpired:
                proc.kill()
                out.append((trial, proc.wait()))
        self.running = {}
        return out


class RayTrials:
    """Trials as Ray tasks, each with `cpus` CPUs and `gpus` GPUs; Ray places and queues them."""

    def __init__(self, address: str, cpus: int, gpus: float):
        from fastrl import cluster

        self.ray = cluster.import_ray()
        self.owns_ray = cluster.connect(address)
        cluster.check_cpus(cpus, f"a trial ({cpus} CPUs: its env workers and its trainer)")
        self.slots = math.inf
        self.task = self.ray.remote(run_trial).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self.running: dict = {}  # ObjectRef -> Trial

    def start(self, trial: Trial, args: list[str]) -> None:
        trial.log.parent.mkdir(parents=True, exist_ok=True)
        self.running[self.task.remote(args, str(trial.log))] = trial

    def wait(self, timeout: float) -> list[tuple[Trial, int]]:
        """The trials whose task ended, with its exit code; [] if none did in `timeout` s."""
        ray = self.ray
        done, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            trial = self.running.pop(ref)
            try:
                out.append((trial, ray.get(ref)))
            except ray.exceptions.RayError as exc:  # its node or its worker died
                with open(trial.log, "a") as log:
                    log.write(f"\n=== the Ray task ended: {str(exc).strip().splitlines()[0]}\n")
                out.append((trial, TASK_LOST))
        return out

    def stop(self) -> list[tuple[Trial, int]]:
        ray = self.ray
        for ref in self.running:
            ray.cancel(ref)  # KeyboardInterrupt in run_trial: the run stops and saves
        out = []
        for ref, trial in self.running.items():
            try:
                out.append((trial, ray.get(ref, timeout=STOP_GRACE_S + 10)))
            except Exception:
                out.append((trial, TASK_LOST))
        self.running = {}
        return out

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()


def run_sweep(out: Path, plan: dict, say=print) -> dict:
    """Runs (or goes on with) the sweep in `out` as `plan` says (see `plan_sweep`); returns
    the results (also in results.json). Raises KeyboardInterrupt after saving, if stopped."""
    trials = make_trials(out, plan["grid"], plan["seeds"])
    todo = [t for t in trials if not t.finished()]
    if len(todo) < len(trials):
        say(f"{len(trials) - len(todo)} of {len(trials)} trials already finished")
    cpus = f"{plan['trial_cpus']} CPU{'s' if plan['trial_cpus'] > 1 else ''} each"
    if plan["ray"] is not None:
        pool = RayTrials(plan["ray"], plan["trial_cpus"], plan["gpus_per_trial"])
        where = f"as Ray tasks ({cpus})"
    else:
        pool = LocalTrials(plan["parallel"])
        where = f"{plan['parallel']} at a time ({cpus}, of {cpu_capacity():g} here)"
    say(f"sweep: {len(todo)} trials {where}; results in {out}")
    started = time.monotonic()
    queue = list(todo)

    def report(trial: Trial, code: int) -> None:
        """Says how the trial's process ended; queues it again if it died and may be retried."""
        if trial.finished():
            s = trial.summary()
            solved = f"solved in {s['solve_wall_s']:.1f} s" if s["solved"] else "not solved"
            say(f"  {trial.name}: {solved}, final eval {s['final_eval_mean']:.1f} "
                f"[{time.monotonic() - started:.0f} s]")
            return
        how = "its Ray task was lost" if code == TASK_LOST else f"exit code {code}"
        if code != EXIT_CONFIG_ERROR and trial.attempts <= plan["retries"]:
            say(f"  {trial.name}: ended ({how}); retrying from its last saved state "
                f"(retry {trial.attempts} of {plan['retries']}; see {trial.log})")
            queue.insert(0, trial)
        else:
            say(f"  {trial.name}: failed ({how}; see {trial.log})")

    # SIGTERM (a scheduler's, a container's) stops the sweep as Ctrl-C does: its trials save.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while queue or pool.running:
            while queue and len(pool.running) < pool.slots:
                trial = queue.pop(0)
                trial.attempts += 1
                pool.start(trial, trial.command(plan["train_args"]))
            ended = pool.wait(timeout=PROGRESS_S)
            for trial, code in ended:
                trial.returncode = code
                report(trial, code)
                write_results(out, trials)
            if not ended:  # a line now and then on long trials: the sweep is alive, and how far
                done = sum(t.finished() for t in trials)
                say(f"  [{time.monotonic() - started:.0f} s] {len(pool.running)} running, {done} of {len(trials)} "
                    f"finished, {len(queue)} waiting")
    except KeyboardInterrupt:
        say("sweep: stopping; each running trial saves its state")
        for trial, code in pool.stop():
            trial.returncode = code
        write_results(out, trials)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if isinstance(pool, RayTrials):
            pool.close()
    results = write_results(out, trials)
    try:
        draw_curves(out, trials)
    except Exception as exc:  # a plot is not worth a failed sweep (no episode ended, a full disk)
        say(f"fastrl: warning: no curves.png: {exc}")
    return results


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def plan_sweep(out: Path, train_args: list[str], config: TrainConfig, grid: dict, seeds: list[int],
               parallel: int, ray: str | None, gpus_per_trial: float, retries: int) -> dict:
    """The sweep's plan, saved as sweep.json in `out` (a new folder)."""
    cpus = busy_cores(config)
    parallel = parallel or max(1, int(cpu_capacity() // cpus))
    if (parallel > 1 or ray is not None) and "--pin-workers" not in train_args:
        train_args = [*train_args, "--no-pin-workers"]  # trials share the machine: no core is a worker's own
    plan = {"train_args": train_args, "grid": grid, "seeds": seeds, "ray": ray, "gpus_per_trial": gpus_per_trial,
            "retries": retries, "trial_cpus": cpus, "parallel": parallel}
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"invalid --out={str(out)!r}: it is not empty (go on with a stopped sweep there with "
                          f"fastrl sweep --resume {out})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SWEEP_FILE, json.dumps(plan, indent=2).encode())
    return plan


def load_plan(out: Path) -> dict:
    try:
        return json.loads((out / SWEEP_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"cannot resume {str(out)!r}: it holds no sweep (no {SWEEP_FILE})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume {str(out)!r}: {SWEEP_FILE} is unreadable ({exc})") from None


def trial_row(trial: Trial) -> dict:
    s = trial.summary() or {}
    status = ("finished" if trial.finished() else "interrupted" if s.get("interrupted")
              else "failed" if s.get("error") or trial.returncode not in (None, 0) else "not run")
    keys = ("solved", "solve_wall_s", "solve_env_steps", "final_eval_mean", "final_eval_std", "env_steps", "wall_s",
            "resumes")
    return {"setting": setting_name(trial.setting), "seed": trial.seed, "status": status,
            "processes": trial.processes(), **{k: s.get(k) for k in keys}, "error": s.get("error"),
            "run_dir": str(trial.run_dir)}


def setting_row(name: str, rows: list[dict]) -> dict:
    solved = [r for r in rows if r["solved"]]

    def spread(key: str, among: list[dict]) -> dict | None:
        values = [r[key] for r in among if r[key] is not None]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

    return {"setting": name, "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
            "solved": len(solved), "solve_wall_s": spread("solve_wall_s", solved),
            "solve_env_steps": spread("solve_env_steps", solved),
            "final_eval_mean": spread("final_eval_mean", [r for r in rows if r["status"] == "finished"])}


def write_results(out: Path, trials: list[Trial]) -> dict:
    rows = [trial_row(t) for t in trials]
    names = list(dict.fromkeys(r["setting"] for r in rows))
    settings = [setting_row(n, [r for r in rows if r["setting"] == n]) for n in names]
    results = {"trials": rows, "settings": settings}
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    atomic_write(out / "results.txt", format_results(results).encode())
    return results


def format_results(results: dict) -> str:
    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def med(d: dict | None, spec: str) -> str:
        return "-" if d is None else f"{format(d['median'], spec)} ({format(d['min'], spec)}-{format(d['max'], spec)})"

    lines = ["| setting | solved | s to solve, median (range) | env steps to solve | final eval, median (range) |",
             "|---|---:|---:|---:|---:|"]
    for s in results["settings"]:
        lines.append(f"| {s['setting']} | {s['solved']}/{s['trials']} | {med(s['solve_wall_s'], '.1f')} | "
                     f"{med(s['solve_env_steps'], ',.0f')} | {med(s['final_eval_mean'], '.1f')} |")
    lines += ["", "| setting | seed | status | processes | solved | s to solve | env steps to solve | final eval |",
              "|---|---:|---|---:|---|---:|---:|---:|"]
    for r in results["trials"]:
        final = "-" if r["final_eval_mean"] is None else f"{r['final_eval_mean']:.1f} ± {r['final_eval_std']:.1f}"
        lines.append(f"| {r['setting']} | {r['seed']} | {r['status']} | {r['processes']} | "
                     f"{num(r['solved'], '')} | {num(r['solve_wall_s'], '.1f')} | "
                     f"{num(r['solve_env_steps'], ',')} | {final} |")
    return "\n".join(lines) + "\n"


def draw_curves(out: Path, trials: list[Trial]) -> Path | None:
    """curves.png: each setting's median curve and band over its seeds."""
    from fastrl.plot import plot

    dirs = [t for t in trials if t.summary() is not None]
    if not dirs:
        return None
    return plot([t.run_dir for t in dirs], out / "curves.png",
                labels={str(t.run_dir): setting_name(t.setting) for t in dirs}, title=f"sweep {out.name}")

