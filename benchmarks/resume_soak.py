"""Kill-and-resume soak: training runs stopped at random moments (Ctrl-C, SIGTERM or
kill -9, at random) and resumed with `fastrl train --resume` until each is done.

Checks, for every stop: the trainer ended (no hang), no process of its group is left,
and every checkpoint in the run dir loads (checksum included); at the end, every run
finished. Prints the counts as a table and writes them as JSON.

    python benchmarks/resume_soak.py --runs 20                      # CartPole, random stops
    python benchmarks/resume_soak.py --env LunarLander-v3 --runs 1 --signals SIGTERM SIGKILL --in-order \\
        --min-delay 40 --max-delay 60                                # one SIGTERM, then one kill -9
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastrl import checkpoint  # noqa: E402

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


def left_in_group(pgid: int, wait_s: float = 5.0) -> list[int]:
    """The processes of group `pgid` still running (not zombies) after up to `wait_s` seconds:
    workers of a killed trainer take a moment to end."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    left.append(int(stat.parent.name))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def stacks(pgid: int) -> str:
    """The Python stacks of the processes of group `pgid` (py-spy, if installed): where a
    stop hung."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed"
    dumps = []
    for pid in left_in_group(pgid, wait_s=0):
        done = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        dumps.append(done.stdout + done.stderr)
    return "\n".join(dumps)


def files_load(run_dir: Path) -> list[str]:
    """The checkpoints of `run_dir` that do not load (each must, whenever the run stopped)."""
    bad = []
    if (run_dir / "checkpoint.pt").exists():
        try:
            checkpoint.load(run_dir)
        except ValueError as exc:
            bad.append(str(exc))
    if (run_dir / "state.pt").exists():
        try:
            checkpoint.load_payload(run_dir / "state.pt", checkpoint.STATE_FORMAT, "state")
        except ValueError as exc:
            bad.append(str(exc))
    return bad


def soak_one(run: int, args: argparse.Namespace, rng: random.Random, out_dir: Path) -> dict:
    run_dir = out_dir / f"run{run}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [sys.executable, "-m", "fastrl", "train", "--env", args.env, "--seed", str(run), "--no-progress",
             *args.train_args]
    counts = {"run": run, "stops": {name: 0 for name in args.signals}, "resumes": 0, "restarts_from_zero": 0,
              "hangs": 0, "processes_left": 0, "unreadable": [], "finished": False, "solved": None}
    pending = list(args.signals) if args.in_order else None
    started = time.perf_counter()
    while True:
        resuming = (run_dir / "state.pt").exists()
        if not resuming and run_dir.exists():  # stopped before its first state.pt: start again from zero
            shutil.rmtree(run_dir)
            counts["restarts_from_zero"] += 1
        cmd = [*train, "--resume", str(run_dir)] if resuming else [*train, "--run-dir", str(run_dir)]
        counts["resumes"] += resuming
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        name = None
        if pending is None or pending:
            delay = rng.uniform(args.min_delay, args.max_delay)
            name = pending.pop(0) if pending is not None else rng.choice(args.signals)
        try:
            proc.wait(timeout=delay if name else args.timeout)
            name = None  # it ended before its stop came
        except subprocess.TimeoutExpired:
            if name is None:
                raise
            # Ctrl-C reaches the whole process group, as in a terminal; SIGTERM and kill -9 the trainer only.
            if name == "SIGINT":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, SIGNALS[name])
            counts["stops"][name] += 1
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                counts["hangs"] += 1
                counts.setdefault("hung_after", []).append(name)  # the signal that did not end it
                counts.setdefault("hung_stacks", []).append(stacks(proc.pid))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if left_in_group(proc.pid):
            counts["processes_left"] += 1
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        counts["unreadable"] += files_load(run_dir)
        err = proc.stderr.read()
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if summary is not None and not summary["interrupted"] and summary["error"] is None:  # it ran to its end
            counts.update(finished=True, solved=summary["solved"], env_steps=summary["env_steps"],
                          solve_env_steps=summary["solve_env_steps"], final_eval_mean=summary["final_eval_mean"])
            break
        if name is None:  # it ended, by itself, with an error
            counts["error"] = err.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            break
    counts["wall_s"] = round(time.perf_counter() - started, 1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    parser.add_argument("--in-order", action="store_true", help="stop once with each of --signals, in order, then "
                                                                "let the run finish")
    parser.add_argument("--min-delay", type=float, default=3.0, help="seconds after a start before its stop, at least")
    parser.add_argument("--max-delay", type=float, default=25.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a run may take after its last stop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stop times and signals")
    parser.add_argument("--out", default="benchmarks/results/soak", help="where the run dirs and soak.json go")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more fastrl train options")
    args = parser.parse_args()
    # Started in the background by a shell without job control (`... &` in a script), this
    # process and so its children would ignore Ctrl-C, and fastrl leaves an ignored signal
    # ignored: a handler here makes the children start with Ctrl-C's default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args.train_args = [a for a in args.train_args if a != "--"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    results = []
    print(f"{'run':>3} {'stops':>30} {'resumes':>7} {'from 0':>6} {'hangs':>5} {'left':>4} {'unreadable':>10} "
          f"{'finished':>8} {'solved':>6} {'wall s':>7}", flush=True)
    for run in range(args.runs):
        c = soak_one(run, args, rng, out_dir)
        results.append(c)
        stops = " ".join(f"{k}={v}" for k, v in c["stops"].items())
        print(f"{run:>3} {stops:>30} {c['resumes']:>7} {c['restarts_from_zero']:>6} {c['hangs']:>5} "
              f"{c['processes_left']:>4} {len(c['unreadable']):>10} {str(c['finished']):>8} {str(c['solved']):>6} "
              f"{c['wall_s']:>7}", flush=True)
        (out_dir / "soak.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    total = {k: sum(r["stops"][k] for r in results) for k in args.signals}
    print(f"\n{args.runs} runs: stops {total}, resumes {sum(r['resumes'] for r in results)}, "
          f"restarts from zero {sum(r['restarts_from_zero'] for r in results)}, "
          f"hangs {sum(r['hangs'] for r in results)}, processes left {sum(r['processes_left'] for r in results)}, "
          f"unreadable checkpoints {sum(len(r['unreadable']) for r in results)}, "
          f"finished {sum(r['finished'] for r in results)}/{args.runs}, "
          f"solved {sum(bool(r['solved']) for r in results)}/{args.runs}")


if __name__ == "__main__":
    main()
