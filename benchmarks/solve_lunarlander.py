"""Time to solve LunarLander-v3 with the default `fastrl train`, over several seeds.

"Solved" = a greedy evaluation over 100 episodes, on env seeds disjoint from
training, reaches a mean >= 200; the wall time counts from process start.

    python benchmarks/solve_lunarlander.py --seeds 0 1 2 3 4 [-- extra fastrl train options]
"""
from __future__ import annotations

import argparse

from solve import machine, run_seeds, summarize, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="benchmarks/results/solve_lunarlander.json")
    parser.add_argument("--runs-dir", default="runs/bench_solve_lunarlander")
    parser.add_argument("train_args", nargs="*", help="extra fastrl train options (after --)")
    args = parser.parse_args()
    print(f"LunarLander-v3, ddqn, default config {' '.join(args.train_args)} on {machine()}")
    rows = run_seeds("LunarLander-v3", "ddqn", args.seeds, args.train_args, args.runs_dir)
    write_json(args.out, {"env": "LunarLander-v3", "algo": "ddqn", "train_args": args.train_args,
                          "machine": machine(), "runs": rows, **summarize(rows)})


if __name__ == "__main__":
    main()
