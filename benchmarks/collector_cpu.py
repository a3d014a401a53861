"""Is collection short of the limit because cores sit idle, or because each env step costs more?

Interleaves, per round, on LunarLander-v3 with random actions (Linux: reads /proc):
  single       the raw env in one process (x cores = the limit `fastrl bench` uses)
  fastrl       fastrl's collector into the replay ring, 2 workers x (--envs / 2), in
               lockstep and ready-first
and prints, per collection mode: its ratio to that round's limit, the share of the
machine left idle while it ran, each process's share of a core on the CPU and runnable
but waiting for one (/proc/<pid>/schedstat), and the workers' CPU time per env step in
units of the single process's time per step (1.0 = a worker steps as fast as the raw
env alone; the limit assumes 1.0 on every core).

    python benchmarks/collector_cpu.py --envs 256 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fastrl.bench import CollectCase, CollectorLoop, SingleProcess, machine
from fastrl.system import cpu_capacity

ENV = "LunarLander-v3"


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        ticks = list(map(int, f.readline().split()[1:]))
    return ticks[3] + ticks[4], sum(ticks[:8])


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on the CPU, ns runnable but waiting for a CPU) of a process's main thread."""
    with open(f"/proc/{pid}/schedstat") as f:
        on_cpu, waiting, _ = map(int, f.read().split())
    return on_cpu, waiting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=256, help="envs, in 2 workers (default: 256)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = cpu_capacity()
    single = SingleProcess(ENV, 0)
    modes = {name: CollectorLoop(CollectCase("async", args.envs, 2, ready_first=name == "ready-first"), ENV,
                                 torch.device("cpu"), 0) for name in ("lockstep", "ready-first")}
    names = ("trainer", "worker 0", "worker 1")
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    print(f"{machine()}\n{ENV}, {args.envs} envs in 2 workers; medians over {args.rounds} rounds of {args.seconds:g} s")
    try:
        for r in range(args.rounds):
            one = single.measure(args.seconds)
            for mode, loop in modes.items():
                pids = [os.getpid()] + [p.pid for p in loop.collector.envs.processes]
                idle0, total0 = machine_idle()
                before, steps0, start = [schedstat(p) for p in pids], loop.env_steps, time.perf_counter()
                rate = loop.measure(args.seconds)
                wall, steps = time.perf_counter() - start, loop.env_steps - steps0
                after = [schedstat(p) for p in pids]
                idle1, total1 = machine_idle()
                out = rows[mode]
                out.setdefault("x limit", []).append(rate / (cores * one))
                out.setdefault("machine idle", []).append((idle1 - idle0) / max(1, total1 - total0))
                for name, (cpu0, wait0), (cpu1, wait1) in zip(names, before, after):
                    out.setdefault(f"{name} on a CPU", []).append((cpu1 - cpu0) / 1e9 / wall)
                    out.setdefault(f"{name} waiting for one", []).append((wait1 - wait0) / 1e9 / wall)
                worker_cpu = sum(a[0] - b[0] for a, b in zip(after[1:], before[1:])) / 1e9
                out.setdefault("worker CPU per env step / single's", []).append(worker_cpu / steps * one)
            print(f"  round {r + 1}/{args.rounds}: single process {one:,.0f} steps/s, "
                  + ", ".join(f"{m} {rows[m]['x limit'][-1]:.2f} x limit" for m in modes), flush=True)
    finally:
        single.close()
        for loop in modes.values():
            loop.close()
    print(f"\n| {'':36} | " + " | ".join(f"{m:>11}" for m in modes) + " |")
    print(f"|{'-' * 38}|" + "|".join(f"{'-' * 12}:" for _ in modes) + "|")
    for key in rows["lockstep"]:
        print(f"| {key:36} | " + " | ".join(f"{statistics.median(rows[m][key]):>11.2f}" for m in modes) + " |")


if __name__ == "__main__":
    main()
