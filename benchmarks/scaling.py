"""Time to solve and end-to-end training throughput against the number of envs.

For each env count, one `fastrl train` process per seed (one after another, see
solve.py) on the current device; prints a table of median env steps to solve, median
wall time to solve (from process start) and end-to-end env steps/s (all env steps over
the run's wall time), and writes JSON and a PNG of the curves. A preset's replay ratio
follows the env count (`fastrl.config.replay_ratio_for`) unless `-- --replay-ratio R`
fixes it.

    python benchmarks/scaling.py --num-envs 8 32 128 --seeds 0 1 2 [-- extra fastrl train options]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from solve import machine, run_seeds, summarize, write_json


def median_or_none(values: list) -> float | None:
    return statistics.median(values) if values else None


def scaling_row(num_envs: int, runs: list[dict]) -> dict:
    """One env count's figures over its seeds (solved runs for the solve figures)."""
    return {"num_envs": num_envs, "runs": runs, **summarize(runs),
            "median_env_steps_per_s": median_or_none([r["env_steps"] / r["wall_s"] for r in runs if r["wall_s"]])}


def format_table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| envs | solved | median env steps to solve | median s to solve | median env steps/s |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['num_envs']} | {r['solved']}/{r['seeds']} | {fmt(r['median_solve_env_steps'], ',.0f')} | "
                     f"{fmt(r['median_solve_wall_s'], '.1f')} | {fmt(r['median_env_steps_per_s'], ',.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = [r["num_envs"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("median_solve_env_steps", "median_solve_wall_s", "median_env_steps_per_s"),
                              ("env steps to solve", "seconds to solve", "env steps/s (end to end)")):
        points = [(e, r[key]) for e, r in zip(envs, rows) if r[key] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(envs, [str(e) for e in envs])
        ax.set_xlabel("envs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--algo", default="ddqn")
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    parser.add_argument("--runs-dir", default="runs/bench_scaling")
    parser.add_argument("train_args", nargs="*", help="extra fastrl train options (after --)")
    args = parser.parse_args()
    title = f"{args.env}, {args.algo} {' '.join(args.train_args)} on {machine()}"
    print(title)
    rows = []
    for num_envs in args.num_envs:
        print(f"{num_envs} envs:", flush=True)
        runs = run_seeds(args.env, args.algo, args.seeds, ["--num-envs", str(num_envs), *args.train_args],
                         args.runs_dir)
        rows.append(scaling_row(num_envs, runs))
    print(format_table(rows))
    write_json(args.out, {"env": args.env, "algo": args.algo, "train_args": args.train_args, "machine": machine(),
                          "rows": rows})
    png = Path(args.out).with_suffix(".png")
    plot(rows, png, title)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
