"""How close can any lockstep collector get to cores x single-process on this machine?

Interleaves, per round, on LunarLander-v3 with random actions:
  single       the raw env in one process (x cores = the limit `fastrl bench` uses)
  raw x cores  that raw env in one process per core at once, no communication: what the
               cores give together (a VM's vCPUs can share a physical core or its cache)
  independent  one process per core stepping G envs with no communication at all
  bare         the same processes in lockstep with the parent: one pipe round trip per
               step carrying only actions and a reply array (no observations, no ring);
               the workers time their stepping, which splits bare's step time into
               stepping, waiting for the slower worker, and messages
  K apart      the bare workers out of lockstep: each is sent its next step as soon as it
               replies, so long as it stays at most K steps (--ahead) ahead of the
               slowest (every worker gets the same number of steps, so this cannot show
               what fastrl's ready-first collection gains, where the faster one runs on)
  fastrl       fastrl's collector into the replay ring (grouped workers, G envs each, lockstep)
  messages only   fastrl's grouped workers driven ready-first with fixed actions and
               nothing else (no staging, ring or episode statistics): ready-first's
               ceiling, the trainer's work at its least
  fastrl ready-first   fastrl's collector, ready-first (`--collection ready-first`)
and prints each as a ratio to the limit measured right before and after it
(`fastrl.bench.bracketed`); medians over rounds.

    python benchmarks/collector_ceiling.py --envs-per-core 64 --rounds 5
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.connection
import os
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from solve import write_json

from fastrl.bench import CollectCase, CollectorLoop, SingleProcess, bracketed, machine
from fastrl.envs import make_vector_env
from fastrl.system import cpu_capacity, cpu_cores

ENV = "LunarLander-v3"


def bare_worker(conn, n: int, core: int) -> None:
    os.sched_setaffinity(0, {core})
    envs = [gym.make(ENV) for _ in range(n)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    done = [False] * n
    rng = np.random.default_rng(core)

    def step(actions):
        for j, env in enumerate(envs):
            if done[j]:
                env.reset()
                done[j] = False
            else:
                _, _, terminated, truncated, _ = env.step(actions[j])
                done[j] = terminated or truncated

    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        if isinstance(cmd, int):  # `independent`: cmd steps without talking to the parent
            for actions in rng.integers(0, 4, (cmd, n)).tolist():
                step(actions)
            conn.send(cmd)
        else:
            start = time.perf_counter()
            step(cmd)
            conn.send((time.perf_counter() - start, np.zeros(n)))


def drift_apart(conns: list, actions: list, ahead: int) -> None:
    """Steps the bare workers through `actions`, worker i starting step k once it has
    replied to step k - 1 and k <= (the slowest worker's completed steps) + ahead."""
    done, sent = [0] * len(conns), [0] * len(conns)
    while min(done) < len(actions):
        for i, c in enumerate(conns):
            if sent[i] == done[i] < len(actions) and done[i] <= min(done) + ahead:
                c.send(actions[done[i]])
                sent[i] += 1
        for c in mp.connection.wait([c for i, c in enumerate(conns) if sent[i] > done[i]]):
            c.recv()
            done[conns.index(c)] += 1


class MessagesOnly:
    """fastrl's grouped workers stepped ready-first, as the collector does, by a trainer
    that only sends fixed actions and receives the replies."""

    def __init__(self, num_envs: int, workers: int):
        self.envs = make_vector_env(ENV, num_envs, "async", num_workers=workers)
        self.envs.reset(seed=0)
        rng = np.random.default_rng(0)
        self.actions = [rng.integers(0, 4, num_envs // workers) for _ in range(64)]
        self.ready, self.sent, self.steps = range(workers), 0, 0

    def measure(self, seconds: float) -> float:
        envs, start_steps, start = self.envs, self.steps, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for w in self.ready:
                self.sent += 1
                envs.send_group(w, self.actions[self.sent % len(self.actions)])
            self.ready = envs.ready_groups()
            for w in self.ready:
                self.steps += len(envs.recv_group(w)[1])
        return (self.steps - start_steps) / (time.perf_counter() - start)


def raw_worker(conn, core: int) -> None:
    # The limit's own measurement (SingleProcess), in one process per core at once.
    os.sched_setaffinity(0, {core})
    single = SingleProcess(ENV, core)
    while (seconds := conn.recv()) is not None:
        conn.send(single.measure(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs-per-core", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="vector steps per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ahead", type=int, default=1, help="steps a worker may run ahead of the slowest")
    parser.add_argument("--out", default="benchmarks/results/collector_ceiling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores, capacity, g = cpu_cores(), cpu_capacity(), args.envs_per_core  # processes; the limit's multiplier

    def start_workers(target, *args) -> list:
        conns = []
        for core in range(cores):
            parent, child = mp.Pipe()
            mp.Process(target=target, args=(child, *args, core), daemon=True).start()
            conns.append(parent)
        return conns

    conns, raw_conns = start_workers(bare_worker, g), start_workers(raw_worker)
    single = SingleProcess(ENV, 0)
    fastrl = CollectorLoop(CollectCase("async", g * cores, cores), ENV, torch.device("cpu"), 0)
    fastrl_ready_first = CollectorLoop(CollectCase("async", g * cores, cores, ready_first=True), ENV,
                                       torch.device("cpu"), 0)
    messages = MessagesOnly(g * cores, cores)
    actions = np.random.default_rng(0).integers(0, 4, (args.steps, g)).tolist()
    total = args.steps * g * cores
    busy, slowest, wall = [], [], []  # bare, per step: mean and max worker stepping time, wall time

    def raw_x_cores(seconds: float) -> float:
        for c in raw_conns:
            c.send(seconds)
        return sum(c.recv() for c in raw_conns)

    def independent(_: float) -> float:
        start = time.perf_counter()
        for c in conns:
            c.send(args.steps)
        for c in conns:
            c.recv()
        return total / (time.perf_counter() - start)

    def bare(_: float) -> float:
        start = time.perf_counter()
        for a in actions:
            step_start = time.perf_counter()
            for c in conns:
                c.send(a)
            seconds = [c.recv()[0] for c in conns]
            wall.append(time.perf_counter() - step_start)
            busy.append(sum(seconds) / cores)
            slowest.append(max(seconds))
        return total / (time.perf_counter() - start)

    def ahead(_: float) -> float:
        start = time.perf_counter()
        drift_apart(conns, actions, args.ahead)
        return total / (time.perf_counter() - start)

    cases = {"raw x cores": raw_x_cores, "independent": independent, "bare": bare, f"{args.ahead} apart": ahead,
             "fastrl": fastrl.measure, "messages only": messages.measure,
             "fastrl ready-first": fastrl_ready_first.measure}
    print(f"{machine()}\n{ENV}, {cores} processes x {g} envs; each a ratio to {capacity:g} cores x the single "
          f"process measured right before and after it")
    _, measured = bracketed(single.measure, list(cases.values()), 2.0, args.rounds, capacity)
    rows = {name: [rate / limit for rate, limit in per_round]
            for name, per_round in zip(cases, measured)}
    for r in range(args.rounds):
        print(f"round {r + 1}: " + " | ".join(f"{k} {v[r]:.2f}" for k, v in rows.items()))
    for c in conns + raw_conns:
        c.send(None)
    fastrl.close()
    fastrl_ready_first.close()
    messages.envs.close()
    single.close()
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print("median: " + " | ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    # Shares of bare's wall time, over all its steps.
    split = {"stepping": sum(busy) / sum(wall),
             "waiting for the slower worker": (sum(slowest) - sum(busy)) / sum(wall),
             "messages and the parent": (sum(wall) - sum(slowest)) / sum(wall)}
    print("bare lockstep, share of its time: " + " | ".join(f"{k} {v:.2f}" for k, v in split.items()))
    write_json(args.out, {"machine": machine(), "cores": capacity, "processes": cores, "envs_per_core": g,
                          "rounds": rows, "median": medians, "bare_time_split": split})


if __name__ == "__main__":
    main()
