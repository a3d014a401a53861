"""What going through Ray costs the collector: env steps/s into the replay ring, and the
latency of one group step (actions sent to the step back on the trainer), for the local
grouped workers and for Ray actors at the same envs and groups, on this machine,
interleaved in rounds (medians reported). Also the round trip of an empty Ray actor
call, the floor under every remote group step.

    python benchmarks/ray_overhead.py [--env LunarLander-v3] [--layouts 8x1 8x2 32x2 128x2] [--rounds 3]

A layout NxW is N envs in W groups (W worker processes, or W Ray actors). Random
actions, no learning: the data path of `fastrl train` alone (as `fastrl bench collect`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastrl.bench import CollectCase, CollectorLoop, machine
from fastrl.cluster import connect


def group_step_latency_ms(loop: CollectorLoop, steps: int) -> float:
    """Median ms from sending group 0's actions to having its step on the trainer, with no
    other group in flight (those the last run() left in flight are collected first)."""
    collector, action = loop.collector, loop.actions[0]
    for g in range(len(collector.groups)):
        if g not in loop.ready:
            collector.receive(g)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        collector.send(0, action)
        collector.receive(0)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def empty_call_ms(calls: int = 2000) -> float:
    import ray

    @ray.remote(num_cpus=0)
    class Empty:
        def step(self, actions):
            return actions

    actor = Empty.remote()
    ray.get(actor.step.remote(None))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        ray.get(actor.step.remote(None))
        times.append(time.perf_counter() - t)
    ray.kill(actor)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--layouts", nargs="+", default=["8x1", "8x2", "32x2", "128x2"])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/ray_overhead.json")
    args = parser.parse_args()
    connect("")  # one local Ray instance for every case
    device = torch.device("cpu")
    rows = []
    for layout in args.layouts:
        n, w = map(int, layout.split("x"))
        loops = {backend: CollectorLoop(CollectCase(backend, n, w, ready_first=w > 1), args.env, device, seed=0)
                 for backend in ("async", "ray")}
        rates = {backend: [] for backend in loops}
        for _ in range(args.rounds):
            for backend, loop in loops.items():
                rates[backend].append(loop.measure(args.seconds))
        row = {"num_envs": n, "groups": w}
        for backend, loop in loops.items():
            row[f"{backend}_steps_per_s"] = statistics.median(rates[backend])
            row[f"{backend}_rounds"] = rates[backend]
            row[f"{backend}_group_step_ms"] = group_step_latency_ms(loop, args.latency_steps)
            loop.close()
        row["ray_over_local"] = row["async_steps_per_s"] / row["ray_steps_per_s"]
        rows.append(row)
        print(f"{n:>4} envs in {w} groups: local {row['async_steps_per_s']:>8,.0f} env steps/s, "
              f"{row['async_group_step_ms']:.2f} ms a group step | ray {row['ray_steps_per_s']:>8,.0f} env steps/s, "
              f"{row['ray_group_step_ms']:.2f} ms a group step | local/ray {row['ray_over_local']:.2f}x", flush=True)
    empty = empty_call_ms()
    print(f"an empty Ray actor call, round trip: {empty:.2f} ms (median)")
    print()
    print("| envs | groups | local env steps/s | ray env steps/s | local / ray | local group step, ms | "
          "ray group step, ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['num_envs']} | {r['groups']} | {r['async_steps_per_s']:,.0f} | {r['ray_steps_per_s']:,.0f} | "
              f"{r['ray_over_local']:.2f} | {r['async_group_step_ms']:.2f} | {r['ray_group_step_ms']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "env": args.env, "rows": rows,
                                          "empty_ray_call_ms": empty}, indent=2))


if __name__ == "__main__":
    main()
