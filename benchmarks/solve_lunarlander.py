"""Time to solve LunarLander-v3 with the default `fastrl train`, over several seeds.

Each seed runs as its own `python -m fastrl train` process (so the wall time counts
process start-up, imports and compilation), one after another so they do not share
the CPU. "Solved" = a greedy evaluation over 100 episodes on env seeds disjoint from
training reaches a mean >= 200; the time is read from the run's summary.json.

    python benchmarks/solve_lunarlander.py --seeds 0 1 2 3 4 [-- extra train options]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--algo", default="ddqn")
    parser.add_argument("--out", default="benchmarks/results/solve_lunarlander.json")
    parser.add_argument("--runs-dir", default="runs/bench_solve")
    parser.add_argument("train_args", nargs="*", help="extra options passed to fastrl train (after --)")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        run_dir = Path(args.runs_dir) / f"{args.env}__{args.algo}__{seed}__{int(time.time())}"
        cmd = [sys.executable, "-m", "fastrl", "train", "--env", args.env, "--algo", args.algo,
               "--seed", str(seed), "--run-dir", str(run_dir), "--no-progress", *args.train_args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        process_wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        s = json.loads((run_dir / "summary.json").read_text())
        row = {"seed": seed, "solved": s["solved"], "solve_wall_s": s["solve_wall_s"],
               "solve_env_steps": s["solve_env_steps"], "final_eval_mean": s["final_eval_mean"],
               "env_steps": s["env_steps"], "updates": s["updates"], "process_wall_s": process_wall,
               "run_dir": str(run_dir)}
        rows.append(row)
        solved = f"{row['solve_wall_s']:8.1f} {row['solve_env_steps']:>10,}" if row["solved"] else \
            f"{'-':>8} {'-':>10}"
        print(f"seed {seed}: solved={row['solved']!s:5} wall_s/steps {solved}  "
              f"final eval {row['final_eval_mean']:7.1f}  process {process_wall:6.1f} s", flush=True)

    solved = [r for r in rows if r["solved"]]
    times = [r["solve_wall_s"] for r in solved]
    steps = [r["solve_env_steps"] for r in solved]
    result = {
        "env": args.env, "algo": args.algo, "train_args": args.train_args,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "runs": rows, "solved": len(solved), "seeds": len(rows),
        "median_solve_wall_s": statistics.median(times) if times else None,
        "min_solve_wall_s": min(times) if times else None,
        "max_solve_wall_s": max(times) if times else None,
        "median_solve_env_steps": statistics.median(steps) if steps else None,
    }
    print(f"\nsolved {len(solved)}/{len(rows)}", end="")
    if times:
        print(f"; time to solve median {result['median_solve_wall_s']:.1f} s "
              f"(min {min(times):.1f}, max {max(times):.1f}); "
              f"env steps median {result['median_solve_env_steps']:,.0f}")
    else:
        print()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
