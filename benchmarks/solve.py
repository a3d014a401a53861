"""Shared runner for the time-to-solve benchmarks: one `python -m fastrl train`
process per seed, one after another (they never share the CPU), results read back
from each run's summary.json. Wall times count process start-up, imports and
compilation, as a user would see them."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastrl.bench import machine  # noqa: F401  (re-exported for the solve scripts)


def run_seeds(env: str, algo: str, seeds: list[int], train_args: list[str], runs_dir: str) -> list[dict]:
    rows = []
    for seed in seeds:
        run_dir = Path(runs_dir) / f"{env}__{algo}__{seed}__{int(time.time())}"
        cmd = [sys.executable, "-m", "fastrl", "train", "--env", env, "--algo", algo, "--seed", str(seed),
               "--run-dir", str(run_dir), "--no-progress", *train_args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        process_wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"seed {seed} failed ({proc.returncode}):\n{proc.stderr}")
        s = json.loads((run_dir / "summary.json").read_text())
        row = {"seed": seed, "process_wall_s": process_wall, "run_dir": str(run_dir),
               **{k: s[k] for k in ("solved", "solve_wall_s", "solve_env_steps", "final_eval_mean",
                                    "best_eval_mean", "env_steps", "updates", "wall_s")}}
        rows.append(row)
        solve = (f"{row['solve_wall_s']:7.1f} s {row['solve_env_steps']:>9,} steps" if row["solved"]
                 else f"{'not solved':>25}")
        best = row["best_eval_mean"]
        print(f"seed {seed}: {solve} | final eval {row['final_eval_mean']:7.1f} | best 100-ep eval "
              f"{best if best is None else round(best, 1)} | {row['env_steps']:,} steps in "
              f"{process_wall:6.1f} s (process)", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    solved = [r for r in rows if r["solved"]]
    times = [r["solve_wall_s"] for r in solved]
    steps = [r["solve_env_steps"] for r in solved]
    out = {"solved": len(solved), "seeds": len(rows),
           "median_solve_wall_s": statistics.median(times) if times else None,
           "min_solve_wall_s": min(times) if times else None,
           "max_solve_wall_s": max(times) if times else None,
           "median_solve_env_steps": statistics.median(steps) if steps else None}
    line = f"solved {len(solved)}/{len(rows)}"
    if times:
        line += (f"; time to solve median {out['median_solve_wall_s']:.1f} s (min {min(times):.1f}, "
                 f"max {max(times):.1f}); env steps to solve median {out['median_solve_env_steps']:,.0f}")
    print(line, flush=True)
    return out


def write_json(path: str, data: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
