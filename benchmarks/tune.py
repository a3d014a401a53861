"""Searches the DDQN configuration that solves an env fastest on this machine (Optuna).

Each trial runs `fastrl train` (one process per tuning seed, see solve.py) with sampled
options on top of the preset, each under a wall-clock budget. Its cost is the mean time
to solve from process start; a seed that does not solve within the budget ends the trial
(the other seeds are not run) at a cost above the budget that falls as its final greedy
evaluation rises, so the search can tell near misses from failures. The first trial is
the env's preset itself; options after `--` go to every run (an env variant, say). The
study lives in a SQLite file, so a search can be stopped and resumed. Tune on some
seeds, then report the best configuration on others with
`python benchmarks/solve_lunarlander.py --seeds ... -- <its options>`.

    pip install -e ".[tune]"
    python benchmarks/tune.py --trials 40 --seeds 100 101 --budget-s 90
    python benchmarks/tune.py --seeds 100 101 --budget-s 300 -- --env-kwargs enable_wind=true wind_power=15
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from solve import machine, run_seeds, write_json

from fastrl.config import PRESETS, TrainConfig


def sample_options(trial) -> dict:
    """The search space: `fastrl train` options (names as in TrainConfig)."""
    width = trial.suggest_categorical("width", [64, 128, 256])
    return {
        "hidden": [width, width],
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
        "replay_ratio": trial.suggest_float("replay_ratio", 0.03, 0.25, log=True),
        "lr": trial.suggest_float("lr", 2e-4, 3e-3, log=True),
        "n_step": trial.suggest_categorical("n_step", [1, 3, 5]),
        "tau": trial.suggest_float("tau", 0.002, 0.05, log=True),
        "eps_decay_steps": trial.suggest_int("eps_decay_steps", 10_000, 60_000, step=5_000),
        "eps_end": trial.suggest_float("eps_end", 0.01, 0.1, log=True),
        "learning_starts": trial.suggest_int("learning_starts", 1_000, 10_000, step=1_000),
        "num_envs": trial.suggest_categorical("num_envs", [4, 8, 16, 32]),
        "eval_interval": trial.suggest_categorical("eval_interval", [10_000, 20_000]),
        "per_alpha": trial.suggest_categorical("per_alpha", [0.0, 0.4, 0.6]),
    }


def preset_params(env: str) -> dict | None:
    """The env's DDQN preset as a point of the search space (None if it has no preset)."""
    preset = PRESETS.get(("ddqn", env))
    if preset is None:
        return None
    names = ("batch_size", "replay_ratio", "lr", "n_step", "tau", "eps_decay_steps", "eps_end", "learning_starts",
             "num_envs", "eval_interval", "per_alpha")
    defaults = TrainConfig()  # what the preset leaves as it is
    return {"width": preset["hidden"][0], **{name: preset.get(name, getattr(defaults, name)) for name in names}}


def unsolved_cost(budget_s: float, final_eval_mean: float | None) -> float:
    """Above the budget, by a quarter of each point the final evaluation fell short of 200."""
    final = -200.0 if final_eval_mean is None else max(-200.0, min(200.0, final_eval_mean))
    return budget_s + (200.0 - final) / 4


def train_args(options: dict, budget_s: float) -> list[str]:
    args = ["--time-limit-s", str(budget_s)]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return args


def main() -> None:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101], help="tuning seeds (never report on them)")
    parser.add_argument("--budget-s", type=float, default=90.0, help="wall-clock budget of each run's training loop")
    parser.add_argument("--timeout-s", type=float, default=None, help="stop starting trials after this many seconds")
    parser.add_argument("--study", default="benchmarks/results/tune.db", help="SQLite file holding the study")
    parser.add_argument("--out", default="benchmarks/results/tune.json")
    parser.add_argument("--runs-dir", default="runs/bench_tune")
    parser.add_argument("train_args", nargs="*", help="fastrl train options for every run (after --)")
    args = parser.parse_args()
    Path(args.study).parent.mkdir(parents=True, exist_ok=True)
    name = f"ddqn-{args.env}-seeds-{'-'.join(map(str, args.seeds))}" + "".join(f" {a}" for a in args.train_args)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{args.study}", load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    print(f"{name} on {machine()}: {len(study.trials)} trials so far", flush=True)
    preset = preset_params(args.env)
    if not study.trials and preset:  # the preset first: the search starts from what fastrl does today
        study.enqueue_trial(preset)

    def objective(trial) -> float:
        options = sample_options(trial)
        cost = 0.0
        for seed in args.seeds:
            (row,) = run_seeds(args.env, "ddqn", [seed], train_args(options, args.budget_s) + args.train_args,
                               args.runs_dir)
            trial.set_user_attr(f"seed_{seed}", {k: row[k] for k in ("solved", "solve_wall_s", "solve_env_steps",
                                                                    "final_eval_mean")})
            if not row["solved"]:
                cost = unsolved_cost(args.budget_s, row["final_eval_mean"])
                break
            cost += row["solve_wall_s"] / len(args.seeds)
        print(f"trial {trial.number}: {cost:.1f} | {json.dumps(options)}", flush=True)
        return cost

    study.optimize(objective, n_trials=args.trials, timeout=args.timeout_s)
    best = study.best_trial
    options = " ".join(train_args(sample_options(best), 0)[2:])
    print(f"best: trial {best.number}, {best.value:.1f} s: fastrl train {options}")
    write_json(args.out, {"env": args.env, "train_args": args.train_args, "seeds": args.seeds,
                          "budget_s": args.budget_s, "machine": machine(),
                          "best": {"number": best.number, "value": best.value, "params": best.params},
                          "trials": [{"number": t.number, "value": t.value, "params": t.params, **t.user_attrs}
                                     for t in study.trials if t.value is not None]})


if __name__ == "__main__":
    main()
