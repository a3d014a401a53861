"""A first run learns eagerly while another process compiles its learner step (fastrl.precompile)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastrl import accel, precompile
from fastrl.config import make_config
from fastrl.envs import inspect_env


class Ready:
    """A switch that becomes ready after `after` calls of ready()."""

    def __init__(self, after: int):
        self.after, self.calls, self.told = after, 0, []

    def ready(self) -> bool:
        self.calls += 1
        return self.calls > self.after

    def switched(self, eager_updates: int, compile_s: float) -> None:
        self.told.append((eager_updates, compile_s))


def test_the_update_runs_eagerly_until_the_switch_is_ready_then_compiled_for_good():
    ran = []
    switch = Ready(after=3)
    step = accel.EagerUntilReady(lambda: ran.append("eager"), lambda: ran.append("compiled"), switch)
    for _ in range(6):
        step()
    assert ran == ["eager"] * 3 + ["compiled"] * 3
    assert switch.calls == 4  # not asked again once compiled
    assert len(switch.told) == 1 and switch.told[0][0] == 3 and switch.told[0][1] >= 0


def test_runs_that_differ_only_outside_the_learner_share_its_compiled_step():
    spec = inspect_env("CartPole-v1", {})
    key = precompile.learner_key(make_config(env_id="CartPole-v1"), spec, 1)
    for same in (dict(seed=7), dict(lr=1e-2), dict(total_steps=5), dict(eps_end=0.5), dict(backend="sync")):
        assert precompile.learner_key(make_config(env_id="CartPole-v1", **same), spec, 1) == key, same
    for other in (dict(hidden=(32,)), dict(batch_size=32), dict(n_step=5), dict(num_envs=8), dict(threads=2)):
        assert precompile.learner_key(make_config(env_id="CartPole-v1", **other), spec, 1) != key, other
    assert precompile.learner_key(make_config(env_id="CartPole-v1"), spec, 2) != key  # ring write heads
    assert precompile.learner_key(make_config(env_id="Acrobot-v1"), inspect_env("Acrobot-v1", {}), 1) != key


def test_a_step_compiled_with_other_inductor_settings_is_not_taken_for_cached(monkeypatch):
    """How the vector instructions are chosen is part of inductor's cache key."""
    from torch._inductor import config as inductor_config

    spec = inspect_env("CartPole-v1", {})
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    before = precompile.learner_key(make_config(env_id="CartPole-v1"), spec, 1)
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", True)
    assert precompile.learner_key(make_config(env_id="CartPole-v1"), spec, 1) != before


def test_no_background_compile_where_the_step_compiles_here_or_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precompile, "cpu_capacity", lambda: 2.0)
    spec, cpu = inspect_env("CartPole-v1", {}), torch.device("cpu")
    config = make_config(env_id="CartPole-v1", learner="compile", backend="sync")
    assert precompile.Precompile.needed(config, spec, cpu, 1, storage_bytes=1000)
    # No core left free: the trainer's and an env worker's, of 2
    assert not precompile.Precompile.needed(make_config(env_id="CartPole-v1", learner="compile", num_envs=4,
                                                        num_workers=1), spec, cpu, 1, 1000)
    assert not precompile.Precompile.needed(make_config(env_id="CartPole-v1", learner="eager"), spec, cpu, 1, 1000)
    # REINFORCE compiles at its first update: its runs repeat exactly, first runs too.
    assert not precompile.Precompile.needed(make_config(env_id="CartPole-v1", learner="compile", algo="reinforce"),
                                            spec, cpu, 1, 1000)
    assert not precompile.Precompile.needed(config, spec, torch.device("meta"), 1, 1000)  # not the CPU: CUDA
    assert not precompile.Precompile.needed(config, spec, cpu, 1, storage_bytes=2**62)  # no room for a copy
    marker = precompile.marker(precompile.learner_key(config, spec, 1))
    marker.parent.mkdir(parents=True)
    marker.touch()
    assert not precompile.Precompile.needed(config, spec, cpu, 1, 1000)


def fake_python(tmp_path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_background_compile_that_fails_is_said_in_one_line_and_the_step_compiles_here(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, "cat >/dev/null; echo warming >&2; "
                                                                 "echo 'RuntimeError: no C++ compiler' >&2; exit 3"))
    said = []
    job = precompile.Precompile(make_config(env_id="CartPole-v1"), inspect_env("CartPole-v1", {}), 1, said.append)
    deadline = time.monotonic() + 30
    while not job.ready():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.failed == "RuntimeError: no C++ compiler"
    job.switched(12, 20.0)
    assert said == ["the learner step is compiled (compiling it in the background failed (RuntimeError: no C++ "
                    "compiler), so here); 12 updates ran eagerly meanwhile"]
    assert job.summary() == {"background_s": job.ready_after_s, "failed": "RuntimeError: no C++ compiler",
                             "eager_updates": 12, "compile_here_s": 20.0}


def test_a_run_that_ends_first_ends_the_background_compile_and_its_children(monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, f"sleep 60 & echo $$ $! > {pids}; wait"))
    job = precompile.Precompile(make_config(env_id="CartPole-v1"), inspect_env("CartPole-v1", {}), 1, print)
    deadline = time.monotonic() + 10
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not job.ready()
    job.close()
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]:
            assert time.monotonic() < deadline, f"process {pid} still runs"
            time.sleep(0.01)


@pytest.mark.slow
def test_a_first_run_learns_eagerly_while_another_process_compiles_then_loads_it_from_the_cache(tmp_path):
    # Runs as users do, a process each: one that compiled before with another cache folder
    # keeps reading that one (torch fixes some of its folders on first use).
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-cache")}

    def train(name: str, *options: str) -> tuple[dict, str]:
        cmd = [sys.executable, "-m", "fastrl", "train", "--env", "CartPole-v1", "--learner", "compile", "--backend",
               "sync", "--num-envs", "4", "--hidden", "16", "--eval-interval", "0", "--eval-episodes", "2",
               "--eval-envs", "2", "--no-stop-on-solve", "--no-progress", "--run-dir", str(tmp_path / name), *options]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads((tmp_path / name / "summary.json").read_text()), out.stdout

    # Long enough for the other process to compile the step (about half of it on 2 cores).
    first, out = train("first", "--total-steps", "10000000", "--time-limit-s", "60")
    compiled = first["background_compile"]
    assert compiled is not None and compiled["failed"] is None, compiled
    assert compiled["eager_updates"] > 0 and first["updates"] > compiled["eager_updates"], (compiled, first["updates"])
    # Here the step came from the cache the other process filled, not compiled afresh.
    assert compiled["compile_here_s"] < compiled["background_s"] / 2, compiled
    assert "another process compiles it, and updates run eagerly until it is ready" in out
    assert f"{compiled['eager_updates']:,} updates ran eagerly meanwhile" in out
    # The next run finds the step compiled: no background compile.
    second, out = train("second", "--seed", "1", "--total-steps", "2000")
    assert second["background_compile"] is None and "another process" not in out


def test_the_background_compile_dies_with_its_trainer(tmp_path):
    """A trainer killed outright (kill -9, the OOM killer) leaves no compile running on."""
    trainer = ("import time\nfrom fastrl import precompile\nfrom fastrl.config import make_config\n"
               "from fastrl.envs import inspect_env\n"
               "job = precompile.Precompile(make_config(env_id='CartPole-v1'), inspect_env('CartPole-v1', {}), 1,\n"
               "                            print)\n"
               "print(job.process.pid, flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-c", trainer], stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    time.sleep(4)  # it has started compiling
    assert os.path.exists(f"/proc/{child}")
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]:
        assert time.monotonic() < deadline, "the compile outlived its trainer"
        time.sleep(0.05)
