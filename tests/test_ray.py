"""The ray backend and Ray sweeps on a real Ray instance: a simulated two-node cluster
(`ray.cluster_utils.Cluster`), started once for the module. Env groups must step exactly
as the local backends do; an actor or a node that dies, and a cluster that cannot be
reached, are one line."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

from fastrl.buffer import ReplayRing  # noqa: E402
from fastrl.collector import Collector  # noqa: E402
from fastrl.envs import make_vector_env  # noqa: E402
from fastrl.errors import ConfigError, EnvError, WorkerDied  # noqa: E402

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
TESTS = os.path.dirname(__file__)
# The actors are fresh processes on other "nodes": they import the test envs' module as a
# user's would import theirs, through gymnasium's "module:env id".
MIXED = "scripted_envs:fastrl-test/Mixed-v0"


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, 2 CPUs each, on this machine."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    env = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, logging_level="ERROR")
    yield cluster, node
    ray.shutdown()
    cluster.shutdown()


def collect(envs, table, seed, ready_first=False, order=None):
    """Steps `envs` with the actions of `table` [steps, N] into a ring; with ready_first,
    group by group as they arrive (or in a scripted `order` of groups)."""
    collector = Collector(envs, CPU, ready_first=ready_first)
    groups = collector.groups
    ring = ReplayRing((len(table) + 1) * envs.num_envs, envs.num_envs, collector.obs_shape, CPU, n_step=3, gamma=0.9,
                      groups=len(groups))
    ring.start(collector.reset(seed=seed))
    taken = [0] * len(groups)
    for g, cols in enumerate(groups):
        collector.send(g, table[0, cols])
    while min(taken) < len(table):
        for g in ([order.pop(0)] if order else collector.ready()):
            step = collector.receive(g)
            ring.add(table[taken[g], groups[g]], *step[1:], step.obs, g)
            taken[g] += 1
            if taken[g] < len(table):
                collector.send(g, table[taken[g], groups[g]])
    collector.close()
    return collector, ring


@pytest.mark.parametrize("env_id", [MIXED, "LunarLander-v3"])
def test_ray_env_groups_give_the_transitions_of_the_local_backend(two_nodes, env_id):
    table = torch.randint(0, 2, (80, 4), generator=torch.Generator().manual_seed(7))
    ref, ref_ring = collect(make_vector_env(env_id, 4, "async", None, 4), table, seed=3)
    ray_envs = make_vector_env(env_id, 4, "ray", None, 2)
    got, ring = collect(ray_envs, table, seed=3, ready_first=True)
    assert ring.storage.obs.abs().sum() > 0
    for field, x, y in zip(ring.storage._fields, ring.storage, ref_ring.storage):
        assert torch.equal(x, y), field
    ref_episodes = sorted(zip(*ref.pop_episodes()[:2]))
    assert ref_episodes and sorted(zip(*got.pop_episodes()[:2])) == ref_episodes


def test_ray_env_groups_spread_over_the_nodes(two_nodes):
    envs = make_vector_env(MIXED, 4, "ray", None, 2)
    envs.close()
    assert len({node_id for _, node_id in envs.nodes}) == 2, envs.nodes


def test_ray_groups_stepped_out_of_order_match_lockstep(two_nodes):
    # Group 0 runs 20 steps ahead of group 1, then group 1 catches up.
    table = torch.randint(0, 2, (40, 4), generator=torch.Generator().manual_seed(1))
    order = [0, 0, 1] * 20 + [1] * 20
    _, ref_ring = collect(make_vector_env(MIXED, 4, "sync"), table, seed=5)
    _, ring = collect(make_vector_env(MIXED, 4, "ray", None, 2), table, seed=5, ready_first=True, order=order)
    for field, x, y in zip(ring.storage._fields, ring.storage, ref_ring.storage):
        assert torch.equal(x, y), field


def test_ray_infos_match_plain_async(two_nodes):
    outputs = {}
    for backend, workers in (("async", 4), ("ray", 2)):
        env_id = "scripted_envs:fastrl-test/Info-v0" if backend == "ray" else "fastrl-test/Info-v0"
        envs = make_vector_env(env_id, 4, backend, num_workers=workers)
        _, reset_info = envs.reset(seed=1)
        infos = [reset_info] + [envs.step(np.array([0, 1, 1, 0]))[4] for _ in range(9)]
        envs.close()
        outputs[backend] = infos
    assert any("t" in info for info in outputs["async"])
    for plain, other in zip(outputs["async"], outputs["ray"]):
        assert plain.keys() == other.keys()
        for key in plain:
            assert np.array_equal(plain[key], other[key]), key


def test_an_env_error_in_a_ray_actor_is_the_env_error_with_its_traceback(two_nodes):
    envs = make_vector_env("scripted_envs:fastrl-test/FailingStep-v0", 2, "ray", None, 2)
    try:
        envs.reset(seed=0)
        with pytest.raises(EnvError) as caught:
            for _ in range(60):  # it fails at its 31st step (resets between)
                envs.step(np.zeros(2, np.int64))
    finally:
        envs.close()
    assert "scripted_envs.py" in caught.value.trace and "\n" not in str(caught.value)


def test_a_killed_env_actor_is_a_worker_death_in_one_line(two_nodes):
    envs = make_vector_env(MIXED, 4, "ray", None, 2)
    collector = Collector(envs, CPU, ready_first=True)
    collector.reset(seed=0)
    ray.kill(envs.actors[1])  # it dies a moment later
    deadline = time.monotonic() + 30
    with pytest.raises(WorkerDied) as caught:
        while time.monotonic() < deadline:
            for g in range(2):
                collector.send(g, torch.zeros(2, dtype=torch.int64))
            for g in range(2):
                collector.receive(g)
    collector.close()
    message = str(caught.value)
    assert "env group 1" in message and "Ray actor" in message and "\n" not in message


def test_an_unreachable_cluster_is_one_line_before_any_work(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fastrl", "train", "--env", "CartPole-v1", "--backend", "ray",
                           "--ray-address", "127.0.0.1:9", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in proc.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_bad_ray_address_is_refused_in_one_line():
    from fastrl.cluster import check_reachable

    with pytest.raises(ConfigError, match="invalid ray address 'nohost'"):
        check_reachable("nohost")


def test_a_ray_sweep_runs_the_grid_as_tasks_and_tables_it_as_a_local_one(two_nodes, tmp_path):
    from test_sweep import QUICK, check_results, fastrl

    cluster, _ = two_nodes
    out = tmp_path / "sweep"
    proc = fastrl("sweep", "--ray", cluster.address, "--seeds", "0-2", "--set", "lr=5e-4,1e-3", "--out", str(out),
                  *QUICK)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "as Ray tasks (1 CPU each)" in proc.stdout
    check_results(out, ["lr=5e-4", "lr=1e-3"], [0, 1, 2])


def ray_sweep_with_a_kill(cluster, out, seed, kill):
    """Runs a one-trial sweep as a Ray task, calls `kill(pid of the trial's fastrl train)`
    once the trial has saved its state, and returns the sweep's stdout and the trial's row."""
    from test_sweep import QUICK, check_results, pid_of_trial, wait_for

    cmd = [sys.executable, "-m", "fastrl", "sweep", "--ray", cluster.address, "--seeds", str(seed), "--out", str(out),
           *QUICK, "--total-steps", "8000", "--checkpoint-interval", "1000steps"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = out / "default" / f"seed{seed}"
    wait_for(lambda: (run_dir / "state.pt").exists(), 120, "the trial's first saved state")
    kill(wait_for(lambda: pid_of_trial(run_dir), 10, "the trial's process"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr + stdout
    row = check_results(out, ["default"], [seed])["trials"][0]
    assert row["processes"] == 2 and json.loads((run_dir / "summary.json").read_text())["resumes"] == 1
    return stdout


def test_a_ray_trial_killed_mid_run_is_retried_from_its_checkpoint(two_nodes, tmp_path):
    stdout = ray_sweep_with_a_kill(two_nodes[0], tmp_path / "sweep", 4, lambda pid: os.kill(pid, 9))
    assert "retrying from its last saved state" in stdout


def test_training_with_env_groups_on_two_nodes_and_a_resume(two_nodes, tmp_path):
    cluster, _ = two_nodes
    run = tmp_path / "run"
    common = ["--ray-address", cluster.address, "--no-progress"]
    cmd = [sys.executable, "-m", "fastrl", "train", "--env", "CartPole-v1", "--backend", "ray", "--num-workers", "2",
           "--learner", "eager", "--total-steps", "4000", "--eval-interval", "2000", "--eval-episodes", "5",
           "--run-dir", str(run), *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["backend"] == "ray" and config["collection"] == "ready-first"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] >= 4000 and summary["error"] is None
    proc = subprocess.run([sys.executable, "-m", "fastrl", "train", "--resume", str(run), "--total-steps", "6000",
                           *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] >= 6000 and summary["resumes"] == 1


def actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::EnvGroupActor"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_an_env_actor_that_dies_mid_run_stops_the_run_saved_in_one_line(two_nodes, tmp_path):
    cluster, _ = two_nodes
    run = tmp_path / "run"
    before = set(actor_pids())
    proc = subprocess.Popen([sys.executable, "-m", "fastrl", "train", "--env", "CartPole-v1", "--backend", "ray",
                             "--num-workers", "2", "--learner", "eager", "--total-steps", "1000000",
                             "--checkpoint-interval", "2000steps", "--eval-interval", "0", "--run-dir", str(run),
                             "--ray-address", cluster.address, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "state.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill((set(actor_pids()) - before).pop(), 9)  # one of this run's env groups: a crashed process, a lost node
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fastrl train: error: env group ") and "(a Ray actor on node " in last, stderr
    summary = json.loads((run / "summary.json").read_text())
    assert "ended unexpectedly" in summary["error"] and summary["state"] and (run / "state.pt").exists()


def test_a_ray_trial_whose_ray_worker_dies_is_retried_and_its_run_dies_with_it(two_nodes, tmp_path):
    # The Ray worker running a trial's task is killed (as when its node is lost): the
    # task fails, its `fastrl train` dies with it, and the sweep resumes the trial.
    from test_sweep import wait_for

    def kill_its_ray_worker(trainer: int) -> None:
        with open(f"/proc/{trainer}/stat") as f:
            task_worker = int(f.read().rsplit(")", 1)[1].split()[1])  # its parent: the Ray worker
        os.kill(task_worker, 9)
        wait_for(lambda: not os.path.exists(f"/proc/{trainer}")
                 or open(f"/proc/{trainer}/stat").read().split()[2] == "Z",
                 10, "the trial's process to die with its Ray worker")

    stdout = ray_sweep_with_a_kill(two_nodes[0], tmp_path / "sweep", 5, kill_its_ray_worker)
    assert "ended (its Ray task was lost); retrying from its last saved state" in stdout
