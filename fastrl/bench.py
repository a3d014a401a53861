"""`fastrl bench`: throughput measured side by side in one run.

collect  env steps/s into the replay ring through fastrl's collector, per backend and
         env count, next to the raw env stepped in one process (x cores = the
         machine's limit) and plain gymnasium AsyncVectorEnv (one process per env) and
         SyncVectorEnv.
         Measurements are interleaved in rounds, and the single process is measured
         right before and after each case: each ratio to the limit compares figures
         taken within seconds of each other, on a machine whose speed moves from one
         second to the next. Medians over rounds are reported.
learn    updates/s of the Double-DQN learner step (sample, targets, loss, gradients,
         Adam, target update) per learner mode and batch size.

Writes bench.json (every round of every measurement) and collect.png (steps/s
against the number of envs) to the output directory.
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from fastrl import accel, checkpoint
from fastrl.algos import ddqn
from fastrl.buffer import ReplayRing
from fastrl.collector import Collector
from fastrl.config import TrainConfig, make_config
from fastrl.envs import AUTORESET, EnvSpec, inspect_env, make_vector_env
from fastrl.errors import ConfigError
from fastrl.interrupts import import_held
from fastrl.nets import build_network
from fastrl.optim import Adam
from fastrl.run.logs import DeviceMeans
from fastrl.system import cpu_capacity, cpu_cores, default_workers

PLAIN_MAX_ENVS = 32  # one process per env beyond this only measures the scheduler


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {cpu_capacity():g} cores{gpu}, torch {torch.__version__}, gymnasium {gym.__version__}"


# --- collect ------------------------------------------------------------------------------

class SingleProcess:
    """The raw env in one process, random actions, reset by hand: the per-core rate."""

    label = "single process (raw env)"

    def __init__(self, env_id: str, seed: int):
        self.env = gym.make(env_id)
        self.env.reset(seed=seed)
        # Python ints: the fastest way to hand gymnasium an action.
        self.actions = np.random.default_rng(seed).integers(0, self.env.action_space.n, 1 << 16).tolist()

    def measure(self, seconds: float) -> float:
        env, actions, n = self.env, self.actions, len(self.actions)
        steps, start = 0, time.perf_counter()
        while True:
            for _ in range(256):
                _, _, terminated, truncated, _ = env.step(actions[steps % n])
                steps += 1
                if terminated or truncated:
                    env.reset()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps / elapsed

    def close(self) -> None:
        self.env.close()


def bracketed(single: Callable[[float], float], cases: list[Callable[[float], float]], seconds: float,
              rounds: int, capacity: float) -> tuple[list[float], list[list[tuple[float, float]]]]:
    """Measures each case (a function of seconds returning steps/s) for `seconds`, in
    `rounds` rounds, with the single process measured for `seconds / 2` before the first
    case and after each one. A case's limit is `capacity` (cores) x the mean of the two
    single-process rates around it: a VM's speed moves within seconds, so a rate
    taken once per round would be stale for the cases measured long after it.

    Returns every single-process rate, and per case its (rate, limit) per round."""
    singles: list[float] = []
    out: list[list[tuple[float, float]]] = [[] for _ in cases]
    for r in range(rounds):
        before = single(seconds / 2)
        singles.append(before)
        for measure, per_round in zip(cases, out):
            rate = measure(seconds)
            after = single(seconds / 2)
            singles.append(after)
            per_round.append((rate, capacity * (before + after) / 2))
            before = after
        this_round = singles[-len(cases) - 1:]
        print(f"  round {r + 1}/{rounds}: single process {statistics.median(this_round):,.0f} steps/s "
              f"(median of {len(this_round)}, {min(this_round):,.0f}–{max(this_round):,.0f})", flush=True)
    return singles, out


@dataclass
class CollectCase:
    backend: str      # async | sync | envpool, or gymnasium-sync: gymnasium's own SyncVectorEnv, for reference
    num_envs: int
    num_workers: int  # async only; num_envs = plain AsyncVectorEnv
    ready_first: bool = False  # grouped async: act on each worker's group as soon as it is ready

    @property
    def series(self) -> str:
        if self.backend == "async":
            if self.num_workers == self.num_envs:
                return "async, plain (1 env/process)"
            return "async, grouped, ready-first" if self.ready_first else "async, grouped"
        return "sync, plain SyncVectorEnv" if self.backend == "gymnasium-sync" else self.backend

    @property
    def label(self) -> str:
        grouped = self.backend == "async" and self.num_workers < self.num_envs
        return f"{self.series} ({self.num_workers} workers)" if grouped else self.series


class CollectorLoop:
    """fastrl's collector into a ReplayRing with random actions drawn on the device:
    the training loop's data path without the network."""

    def __init__(self, case: CollectCase, env_id: str, device: torch.device, seed: int):
        self.case = case
        if case.backend == "gymnasium-sync":
            envs = gym.vector.SyncVectorEnv([partial(gym.make, env_id)] * case.num_envs, copy=False,
                                            autoreset_mode=AUTORESET)
        else:
            envs = make_vector_env(env_id, case.num_envs, case.backend, num_workers=case.num_workers)
        self.collector = Collector(envs, device, ready_first=case.ready_first)
        groups = self.collector.groups
        self.n_actions = int(envs.single_action_space.n)
        self.ring = ReplayRing(100_000, case.num_envs, self.collector.obs_shape, device, groups=len(groups))
        self.actions = [torch.zeros(c.stop - c.start, dtype=torch.int64, device=device) for c in groups]
        self.device = device
        self.ring.start(self.collector.reset(seed=seed))
        self.ready = range(len(groups))  # the groups to act on next
        self.env_steps = 0
        self.run(20 * case.num_envs)  # warm-up: first resets, allocator

    def run(self, env_steps: int) -> None:
        """Collects at least `env_steps` more env steps, as train_ddqn does."""
        collector, ring, actions = self.collector, self.ring, self.actions
        target = self.env_steps + env_steps
        while self.env_steps < target:
            for g in self.ready:
                actions[g].random_(0, self.n_actions)
                collector.send(g, actions[g])
            self.ready = collector.ready()
            for g in self.ready:
                step = collector.receive(g)
                ring.add(actions[g], step.rewards, step.terminated, step.truncated, step.obs, g)
                self.env_steps += len(step.rewards)

    def measure(self, seconds: float) -> float:
        start_steps, start = self.env_steps, time.perf_counter()
        while True:
            self.run(2048)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return (self.env_steps - start_steps) / elapsed

    def close(self) -> None:
        self.collector.close()


def collect_cases(num_envs: list[int], envpool: bool) -> list[CollectCase]:
    cases = []
    for n in num_envs:
        if n <= PLAIN_MAX_ENVS:
            cases.append(CollectCase("async", n, n))
        workers = default_workers(n, cpu_cores())  # collection alone: every core steps envs
        if workers < n:
            cases.append(CollectCase("async", n, workers))
            if workers > 1:
                cases.append(CollectCase("async", n, workers, ready_first=True))
        cases.append(CollectCase("sync", n, 0))
        cases.append(CollectCase("gymnasium-sync", n, 0))
        if envpool:
            cases.append(CollectCase("envpool", n, 0))
    return cases


def bench_collect(env_id: str, num_envs: list[int], seconds: float, rounds: int, device: torch.device,
                  seed: int = 0) -> dict:
    try:
        envpool = import_held("envpool")
        has_envpool = env_id in envpool.list_all_envs()
    except ImportError:
        has_envpool = False
    cases = collect_cases(num_envs, has_envpool)
    # Cores' worth of CPU time: a fractional quota (docker --cpus=2.5) counts as 2.5.
    capacity = cpu_capacity()
    single = SingleProcess(env_id, seed)
    loops: list[CollectorLoop] = []
    try:
        for case in cases:
            loops.append(CollectorLoop(case, env_id, device, seed))
        singles, case_rounds = bracketed(single.measure, [loop.measure for loop in loops], seconds, rounds,
                                         capacity)
    finally:
        single.close()
        for loop in loops:
            loop.close()

    single_sps = statistics.median(singles)
    rows = []
    for case, per_round in zip(cases, case_rounds):
        # Ratios per round (against the single process measured around it), then the
        # median; their range shows how much the machine moved from round to round.
        steps = [rate for rate, _ in per_round]
        limits = [limit for _, limit in per_round]
        ratios = [s / limit for s, limit in zip(steps, limits)]
        rows.append({"backend": case.backend, "series": case.series, "label": case.label, "num_envs": case.num_envs,
                     "num_workers": case.num_workers, "steps_per_s": statistics.median(steps),
                     "ratio_to_limit": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                     "rounds": steps, "limits": limits})
    plain = [r for r in rows if r["series"].startswith("async, plain")]
    grouped = [r for r in rows if r["series"].startswith("async, grouped")]
    # Compared through their ratios to the limit around each: steps/s taken minutes apart
    # would compare the machine's speeds as much as the collectors'.
    best_plain = max(plain, key=lambda r: r["ratio_to_limit"]) if plain else None
    best_grouped = max(grouped, key=lambda r: r["ratio_to_limit"]) if grouped else None
    return {
        "env_id": env_id, "device": str(device), "cores": capacity, "seconds": seconds, "rounds": rounds,
        "single_process_steps_per_s": single_sps, "single_measurements": singles,
        "limit_steps_per_s": capacity * single_sps, "rows": rows,
        "best_grouped": best_grouped and {k: best_grouped[k] for k in ("label", "num_envs", "steps_per_s",
                                                                         "ratio_to_limit")},
        "best_plain": best_plain and {k: best_plain[k] for k in ("num_envs", "steps_per_s", "ratio_to_limit")},
        "grouped_over_plain": (best_grouped["ratio_to_limit"] / best_plain["ratio_to_limit"]
                               if best_plain and best_grouped else None),
    }


def format_collect(result: dict) -> str:
    lines = [f"collect: {result['env_id']} into the replay ring on {result['device']}, random actions; "
             f"median of {result['rounds']} interleaved rounds of {result['seconds']:g} s, each ratio to the "
             f"limit against the single process measured right before and after it",
             f"single process (raw env): {result['single_process_steps_per_s']:,.0f} steps/s (median) x "
             f"{result['cores']:g} cores = limit {result['limit_steps_per_s']:,.0f} steps/s",
             "",
             f"| {'backend':<40} | {'envs':>5} | {'env steps/s':>11} | {'x limit':>7} | {'rounds':>9} |",
             f"|{'-' * 42}|{'-' * 6}:|{'-' * 12}:|{'-' * 8}:|{'-' * 10}:|"]
    for r in result["rows"]:
        low, high = r["ratio_range"]
        lines.append(f"| {r['label']:<40} | {r['num_envs']:>5} | {r['steps_per_s']:>11,.0f} | "
                     f"{r['ratio_to_limit']:>7.2f} | {low:.2f}–{high:.2f} |")
    if result["grouped_over_plain"]:
        g, p = result["best_grouped"], result["best_plain"]
        lines += ["", f"best grouped async: {g['label']}, {g['steps_per_s']:,.0f} steps/s ({g['num_envs']} envs) = "
                      f"{g['ratio_to_limit']:.2f} x limit, {result['grouped_over_plain']:.1f} x the best plain "
                      f"AsyncVectorEnv ({p['ratio_to_limit']:.2f} x limit: {p['steps_per_s']:,.0f} steps/s, "
                      f"{p['num_envs']} envs)"]
    return "\n".join(lines)


def plot_collect(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for series in dict.fromkeys(r["series"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["series"] == series]
        ax.plot([r["num_envs"] for r in rows], [r["steps_per_s"] for r in rows], marker="o", label=series)
    ax.axhline(result["limit_steps_per_s"], color="black", linestyle="--",
               label=f"limit: {result['cores']:g} cores x single process")
    ax.axhline(result["single_process_steps_per_s"], color="grey", linestyle=":", label="single process")
    ax.set_xscale("log", base=2)
    counts = sorted({r["num_envs"] for r in result["rows"]})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set_xlabel("number of envs")
    ax.set_ylabel("env steps/s into the ring")
    ax.set_title(f"fastrl collect: {result['env_id']}, {result['cores']:g} cores", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with checkpoint.writing(path):
        fig.savefig(path)
    plt.close(fig)


# --- learn --------------------------------------------------------------------------------

def _filled_ring(env_id: str, device: torch.device, seed: int) -> tuple[ReplayRing, TrainConfig, EnvSpec]:
    """A full ring of random transitions shaped like `env_id`'s, and the DDQN preset."""
    config = make_config(env_id=env_id, algo="ddqn", seed=seed)
    spec = inspect_env(env_id, {})
    gen = torch.Generator(device=device).manual_seed(seed)
    ring = ReplayRing(config.buffer_size, config.num_envs, spec.obs_shape, device, config.n_step, config.gamma)
    shape = (config.num_envs, *spec.obs_shape)
    ring.start(torch.randn(shape, device=device, generator=gen))
    for _ in range(ring.rows):
        n = config.num_envs
        ring.add(torch.randint(0, spec.n_actions, (n,), device=device, generator=gen),
                 torch.randn(n, device=device, generator=gen),
                 torch.rand(n, device=device, generator=gen) < 0.005,
                 torch.rand(n, device=device, generator=gen) < 0.001,
                 torch.randn(shape, device=device, generator=gen))
    return ring, config, spec


def bench_learn(env_id: str, modes: list[str], batch_sizes: list[int], seconds: float, rounds: int,
                device: torch.device, seed: int = 0) -> dict:
    ring, config, spec = _filled_ring(env_id, device, seed)
    cases = []
    for mode in modes:
        for batch_size in batch_sizes:
            torch.manual_seed(seed)
            q = build_network(config, spec.obs_shape, spec.n_actions).to(device)
            q_target = copy.deepcopy(q).requires_grad_(False)
            learn = ddqn.make_learn_step(ring.sampler(batch_size), q, q_target,
                                         Adam(q, config.lr, config.max_grad_norm), config.tau,
                                         config.target_update_interval, mode)
            stats = DeviceMeans(("loss", "q_mean", "grad_norm"), device)

            def updates(n: int, learn=learn, stats=stats) -> None:
                for _ in range(n):  # the training loop's learner body
                    stats.add(learn())
                stats.read()  # one host read, which also waits for the device

            start = time.perf_counter()
            updates(1)
            first_s = time.perf_counter() - start
            updates(10)  # the rest of the warm-up (CUDA graph recording happens here)
            cases.append({"mode": mode, "batch_size": batch_size, "first_call_s": first_s, "run": updates,
                          "rounds": []})
    for _ in range(rounds):
        for case in cases:
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                case["run"](50)
                n += 50
            case["rounds"].append(n / (time.perf_counter() - start))
    rows = []
    for case in cases:
        ups = statistics.median(case["rounds"])
        rows.append({"mode": case["mode"], "batch_size": case["batch_size"], "updates_per_s": ups,
                     "samples_per_s": ups * case["batch_size"], "first_call_s": case["first_call_s"],
                     "rounds": case["rounds"]})
    return {"env_id": env_id, "device": str(device), "hidden": list(config.hidden),
            "threads": torch.get_num_threads(), "seconds": seconds, "rounds": rounds, "rows": rows}


def format_learn(result: dict) -> str:
    hidden = "x".join(map(str, result["hidden"]))
    lines = [f"learn: Double-DQN step on {result['device']} ({result['env_id']} preset, MLP {hidden}, "
             f"{result['threads']} torch thread(s)); median of {result['rounds']} rounds of "
             f"{result['seconds']:g} s",
             "",
             f"| {'mode':<10} | {'batch':>5} | {'updates/s':>9} | {'samples/s':>10} | {'first call s':>12} |",
             f"|{'-' * 12}|{'-' * 6}:|{'-' * 10}:|{'-' * 11}:|{'-' * 13}:|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']:<10} | {r['batch_size']:>5} | {r['updates_per_s']:>9,.0f} | "
                     f"{r['samples_per_s']:>10,.0f} | {r['first_call_s']:>12.1f} |")
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------

def run_bench(what: str, env_id: str, num_envs: list[int], batch_sizes: list[int], modes: list[str],
              seconds: float, rounds: int, device_name: str, threads: int, out_dir: str) -> dict:
    from fastrl.training import resolve_device

    device = resolve_device(device_name)
    if "cudagraphs" in modes and device.type != "cuda":
        raise ConfigError(f"invalid mode 'cudagraphs' on {device.type}: CUDA graphs need a CUDA device")
    inspect_env(env_id, {})
    torch.set_num_threads(threads)
    out = checkpoint.make_dir(out_dir, "--out")
    result: dict = {"machine": machine(), "command": what}
    if what in ("collect", "all"):
        print(f"fastrl bench collect: {env_id}, envs {num_envs}, {rounds} round{'s' * (rounds != 1)}", flush=True)
        result["collect"] = bench_collect(env_id, num_envs, seconds, rounds, device)
        print(format_collect(result["collect"]))
        plot_collect(result["collect"], out / "collect.png")
        checkpoint.save_json(out / "bench.json", result)  # at once: Ctrl-C during `learn` keeps it
    if what in ("learn", "all"):
        print(f"fastrl bench learn: modes {modes}, batch sizes {batch_sizes}", flush=True)
        with accel.denormals_flushed():  # as training runs it
            result["learn"] = bench_learn(env_id, modes, batch_sizes, seconds, rounds, device)
        print(format_learn(result["learn"]))
        checkpoint.save_json(out / "bench.json", result)
    print(f"\nmachine: {result['machine']}\nwrote {out / 'bench.json'}"
          + (f" and {out / 'collect.png'}" if "collect" in result else ""))
    return result
