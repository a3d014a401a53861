"""REINFORCE benchmarks.

CartPole-v1: wall time and env steps until a greedy 100-episode mean >= 475, over
several seeds. LunarLander-v3: the preset as `fastrl train` runs it (its step budget
and learning-rate decay, stopping once solved), cut at a wall-clock budget: the time
and env steps to solve (greedy 100-episode mean >= 200), or the best evaluation.

    python benchmarks/solve_reinforce.py [--seeds 0 1 2 3 4] [--lunar-seeds 0] [--lunar-budget-s 600]
"""
from __future__ import annotations

import argparse

from solve import machine, run_seeds, summarize, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lunar-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--lunar-budget-s", type=float, default=600.0,
                        help="wall-clock budget of the training loop (the final evaluation comes on top)")
    parser.add_argument("--out", default="benchmarks/results/solve_reinforce.json")
    parser.add_argument("--runs-dir", default="runs/bench_solve_reinforce")
    args = parser.parse_args()
    print(f"REINFORCE on {machine()}\nCartPole-v1 (solved = greedy 100-episode mean >= 475):")
    cartpole = run_seeds("CartPole-v1", "reinforce", args.seeds, [], args.runs_dir)
    result = {"machine": machine(), "cartpole": {"runs": cartpole, **summarize(cartpole)}}
    if args.lunar_seeds:
        print(f"LunarLander-v3 within {args.lunar_budget_s:.0f} s (solved = 100-episode mean >= 200):")
        # Only the time limit: a larger step budget would stretch the preset's lr decay over it.
        budget = ["--time-limit-s", str(args.lunar_budget_s)]
        lunar = run_seeds("LunarLander-v3", "reinforce", args.lunar_seeds, budget, args.runs_dir)
        result["lunarlander"] = {"budget_s": args.lunar_budget_s, "runs": lunar, **summarize(lunar)}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
