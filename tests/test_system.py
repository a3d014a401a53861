"""Machine facts (cores, cgroup quotas, memory) and what making env workers does to the
trainer process (pinning, affinity, signals)."""
import ctypes
import multiprocessing
import os
import signal
import sys

import pytest

from fastrl.envs import make_vector_env
from fastrl.system import (
    available_memory,
    cgroup_cpu_quota,
    cgroup_memory_limit,
    cpu_capacity,
    cpu_cores,
    default_workers,
)


@pytest.mark.parametrize("files,quota", [
    ({"cpu.max": "250000 100000\n"}, 2.5),  # cgroup v2, docker --cpus=2.5
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbled\n"}, None),
    ({}, None),  # no cgroup files
])
def test_cgroup_cpu_quota_is_read_from_either_cgroup_version(files, quota, tmp_path):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(str(tmp_path)) == quota


@pytest.mark.parametrize("files,limit", [
    ({"memory.max": "4294967296\n"}, 4 * 2 ** 30),  # cgroup v2, docker --memory=4g
    ({"memory.max": "max\n"}, None),
    ({"memory/memory.limit_in_bytes": "2147483648\n"}, 2 * 2 ** 30),  # cgroup v1
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1's "no limit"
    ({}, None),
])
def test_cgroup_memory_limit_is_read_from_either_cgroup_version(files, limit, tmp_path, monkeypatch):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_memory_limit(str(tmp_path)) == limit
    # MemAvailable counts the host's memory: a container's limit caps it.
    monkeypatch.setattr("fastrl.system.cgroup_memory_limit", lambda: limit)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   3000000 kB\n")
    host = 3000000 * 1024
    assert available_memory(str(meminfo)) == (host if limit is None else min(host, limit))
    assert available_memory(str(tmp_path / "missing")) is None
    assert available_memory() is not None  # this machine's own: Linux


def test_a_cpu_quota_caps_the_cores_and_so_the_default_workers(monkeypatch):
    # On a 64-core host, docker --cpus=2.5 leaves all 64 in the affinity: 3 cores' time, not 64.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr("fastrl.system.cgroup_cpu_quota", lambda: 2.5)
    assert cpu_capacity() == 2.5  # the time granted: fastrl bench's limit counts it (tests/test_bench.py)
    assert cpu_cores() == 3 and default_workers(8) == 2  # the trainer keeps one core; 2 divides 8
    monkeypatch.setattr("fastrl.system.cgroup_cpu_quota", lambda: 0.5)
    assert cpu_capacity() == 0.5 and cpu_cores() == 1 and default_workers(8) == 1
    monkeypatch.setattr("fastrl.system.cgroup_cpu_quota", lambda: None)
    assert cpu_capacity() == 64 and cpu_cores() == 64 and default_workers(8) == 8


@pytest.mark.parametrize("pin", [True, False])
def test_grouped_workers_are_pinned_one_per_core_only_when_asked(pin):
    allowed = os.sched_getaffinity(0)
    workers = min(2, len(allowed))
    envs = make_vector_env("CartPole-v1", 2 * workers, "async", num_workers=workers, pin_workers=pin)
    try:
        affinities = [os.sched_getaffinity(p.pid) for p in envs.workers.processes]
    finally:
        envs.close()
    assert os.sched_getaffinity(0) == allowed  # the trainer itself is never pinned
    if pin:
        assert all(len(a) == 1 for a in affinities) and len(set().union(*affinities)) == workers
    else:
        assert all(a == allowed for a in affinities)


def trainer_state_after_making_envs(workers: int, out=None) -> dict:
    """Makes async envs (AsyncVectorEnv probes an env function in this process) and
    reports what this process, the trainer, must have kept."""
    affinity = os.sched_getaffinity(0)
    envs = make_vector_env("CartPole-v1", 4, "async", num_workers=workers)
    try:
        death_signal = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(death_signal))  # PR_GET_PDEATHSIG
        state = {"affinity kept": os.sched_getaffinity(0) == affinity,
                 "ctrl-c kept": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                 "death signal": death_signal.value}
    finally:
        envs.close()
    if out is not None:
        out.put(state)
    return state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and sched_getaffinity are Linux's")
@pytest.mark.parametrize("trainer", ["main process", "multiprocessing child"])
@pytest.mark.parametrize("workers", [4, 2])
def test_making_async_envs_leaves_the_trainer_as_it_was(workers, trainer):
    # Only worker processes ignore Ctrl-C, are pinned and die with their parent; the
    # trainer keeps all that, also when it is itself a multiprocessing child (a sweep's).
    if trainer == "main process":
        state = trainer_state_after_making_envs(workers)
    else:
        context = multiprocessing.get_context("fork")
        out = context.Queue()
        child = context.Process(target=trainer_state_after_making_envs, args=(workers, out))
        child.start()
        state = out.get(timeout=60)
        child.join(timeout=60)
    assert state == {"affinity kept": True, "ctrl-c kept": True, "death signal": 0}


