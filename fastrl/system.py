"""What this machine offers a run: CPU cores (capped by a cgroup quota), memory (capped
by a cgroup limit), threads, and pinning a process to a core."""
from __future__ import annotations

import math
import os


def thread_limit() -> int:
    """The most torch threads one may ask for: this machine's logical CPUs. (Far more makes
    torch's thread pool exhaust memory or crash, and more than the CPUs is never faster.)"""
    return os.cpu_count() or 1


def cpu_capacity() -> float:
    """Cores' worth of CPU time this process may use: the cores it may run on, capped by a
    cgroup CPU quota (docker --cpus=N, a Kubernetes CPU limit), which leaves every core of
    the host in the affinity but grants only N cores' time (N may be fractional: 2.5)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return float(cores) if quota is None else min(float(cores), quota)


def cpu_cores() -> int:
    """Whole cores to give processes and threads: `cpu_capacity()` rounded up (2.5 -> 3)."""
    return max(1, math.ceil(cpu_capacity()))


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup's CPU quota in cores (2.5 for docker --cpus=2.5), None where there is none."""
    try:
        try:  # cgroup v2: "<quota> <period>", or "max <period>"
            with open(os.path.join(root, "cpu.max")) as f:
                quota, period = f.read().split()
        except FileNotFoundError:  # cgroup v1: the quota (-1: none) and the period, apart
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):  # no cgroup files (not Linux, not mounted), or unreadable
        return None


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, capped by a cgroup
    memory limit (docker --memory, a Kubernetes memory limit), which MemAvailable ignores;
    None where it is unknown (not Linux)."""
    try:
        with open(meminfo) as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    limit = cgroup_memory_limit()
    return available if limit is None else min(available, limit)


def cgroup_memory_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """The cgroup's memory limit in bytes, None where there is none."""
    for name in ("memory.max", os.path.join("memory", "memory.limit_in_bytes")):  # cgroup v2, v1
        try:
            with open(os.path.join(root, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        if not text.isdigit():  # v2's "max"
            return None
        return int(text) if int(text) < 2 ** 60 else None  # v1 writes "none" as about 2**63
    return None


def default_workers(num_envs: int, cores: int = 0) -> int:
    """The largest divisor of num_envs not above `cores`. By default, the cores left once
    the trainer process has one: it acts, writes the ring and learns while the workers
    step, and a worker sharing its core waits for it (`fastrl bench collect` measures
    the layouts)."""
    cores = cores or max(1, cpu_cores() - 1)
    return max(w for w in range(1, min(num_envs, cores) + 1) if num_envs % w == 0)


def pin_to_core(index: int) -> None:
    """Pins this process to one core: worker `index` gets the last core but `index`.
    Workers are woken together every step; left to the scheduler, two of them often
    share a core for a while (wake-affine placement). One core each keeps them parallel.
    From the last core down: with fewer workers than cores the first stays free for
    the trainer."""
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[-1 - index % len(allowed)]})
