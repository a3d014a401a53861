"""What the phase timers cost when profiling is off (the normal training mode).

Runs the same short training with `timers=True` (the default) and `timers=False`
(no timer calls at all), in one process, in the order A B B A A B B A ... so that
machine drift and position effects hit both alike, and compares env steps/s. Also times one timer use directly and
counts the uses per step, which bounds the overhead independently of run-to-run noise.

    python benchmarks/timer_overhead.py [--pairs 4] [--steps 20000] [--env CartPole-v1]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

from solve import machine, write_json

import fastrl
from fastrl.timing import Phases


def timer_cost_s(n: int = 200_000) -> float:
    phases = Phases()
    t0 = time.perf_counter()
    for _ in range(n):
        with phases("x"):
            pass
    timed = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    return (timed - (time.perf_counter() - t0)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--out", default="benchmarks/results/timer_overhead.json")
    args = parser.parse_args()
    # A fast loop (cheap env, in-process, small eager net) is where timer overhead shows most.
    base = dict(env_id=args.env, backend="sync", num_envs=4, hidden=(64, 64), learner="eager",
                total_steps=args.steps, learning_starts=1_000, eval_interval=0, eval_episodes=1, eval_envs=1,
                stop_on_solve=False, progress=False)
    sps = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for timers in ((True, False) if i % 2 == 0 else (False, True)):
                gc.collect()
                s = fastrl.train(fastrl.make_config(**base, timers=timers, run_dir=f"{tmp}/{i}_{timers}"))
                sps[timers].append(s["env_steps_per_s"])
                print(f"pair {i} timers={timers!s:5}: {s['env_steps_per_s']:8,.0f} env steps/s", flush=True)
    on, off = statistics.median(sps[True]), statistics.median(sps[False])
    ratios = [a / b for a, b in zip(sps[True], sps[False])]
    cost = timer_cost_s()
    # Timer uses per vector step of the DDQN loop: act twice (choose, copy out), env twice (send,
    # wait), h2d, ring_write, and per update: update (the target update runs inside it).
    config = fastrl.make_config(**base)
    phase_uses = 6 + config.num_envs * config.replay_ratio
    step_s = config.num_envs / off
    result = {"machine": machine(), "config": {k: str(v) for k, v in base.items()},
              "sps_timers_on": sps[True], "sps_timers_off": sps[False],
              "median_on": on, "median_off": off, "median_ratio_on_off": statistics.median(ratios),
              "timer_use_s": cost, "timer_uses_per_vector_step": phase_uses,
              "bound_share": cost * phase_uses / step_s}
    print(f"\nmedian env steps/s: timers on {on:,.0f}, off {off:,.0f}; "
          f"median paired ratio on/off {result['median_ratio_on_off']:.3f}")
    print(f"one timer use costs {cost * 1e6:.2f} µs; {phase_uses:.0f} uses per vector step of "
          f"{step_s * 1e3:.2f} ms bound the overhead at {result['bound_share']:.2%}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
