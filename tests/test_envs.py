"""Env semantics through the real vector envs into the ring: NEXT_STEP autoreset, truncation
and termination, n-step windows, and the same transitions on every backend and collection."""
import multiprocessing
import sys

import numpy as np
import pytest
import torch

import fastrl
from fastrl.buffer import ReplayRing, transitions_at
from fastrl.collector import Collector
from fastrl.envs import make_vector_env
from fastrl.envs.workers import StepRequest, receive
from fastrl.errors import ConfigError

CPU = torch.device("cpu")


# (backend, num_workers): in-process; one process per env (plain AsyncVectorEnv);
# grouped workers (2 processes x 2 envs).
BACKENDS = {"sync": ("sync", 0), "async-plain": ("async", 4), "async-grouped": ("async", 2)}


def collect(env_id, backend, num_envs=4, steps=40, n_step=1, gamma=0.9, seed=0, capacity=None, num_workers=0,
            env_kwargs=None):
    collector = Collector(make_vector_env(env_id, num_envs, backend, env_kwargs, num_workers), CPU)
    ring = ReplayRing(capacity or (steps + 1) * num_envs, num_envs, collector.obs_shape, CPU, n_step, gamma)
    obs = collector.reset(seed=seed)
    ring.start(obs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        actions = torch.randint(0, collector.envs.single_action_space.n, (num_envs,), generator=gen)
        collector.step_async(actions)
        step = collector.step_wait()
        ring.add(actions, step.rewards, step.terminated, step.truncated, step.obs)
    collector.close()
    return collector, ring


def all_transitions(ring):
    ages = torch.arange(1, ring.size + 1).repeat_interleave(ring.num_envs)
    envs = torch.arange(ring.num_envs).repeat(ring.size)
    start = torch.remainder(ring.head - ages, ring.rows)
    return transitions_at(ring.storage, start, envs, ages, ring.n_step, ring.gamma)


@pytest.mark.parametrize("name", BACKENDS)
def test_reset_steps_are_masked_and_real_steps_are_consistent(name):
    backend, workers = BACKENDS[name]
    _, ring = collect("fastrl-test/Mixed-v0", backend, num_workers=workers)
    tr = all_transitions(ring)
    ep, t = tr.obs[:, 0], tr.obs[:, 1]
    next_ep, next_t = tr.next_obs[:, 0], tr.next_obs[:, 1]
    real = tr.weight == 1
    # A reset pseudo-step starts from a final observation and leads into a new episode.
    assert (~real).any(), "the scripted run must contain episode ends"
    assert torch.all(next_ep[~real] == ep[~real] + 1) and torch.all(next_t[~real] == 0)
    assert torch.all(tr.returns[~real] == 0)
    # Every real transition moves one step forward inside its own episode; the reward
    # encodes that step and the action taken.
    assert torch.all(next_ep[real] == ep[real]) and torch.all(next_t[real] == t[real] + 1)
    expected_reward = next_t[real] + 0.5 * tr.actions[real].float()
    assert torch.allclose(tr.returns[real], expected_reward)


def test_truncation_bootstraps_from_final_obs_and_termination_does_not():
    gamma = 0.9
    _, ring = collect("fastrl-test/Truncating-v0", "sync", num_envs=2, steps=20, gamma=gamma)
    tr = all_transitions(ring)
    last = (tr.weight == 1) & (tr.next_obs[:, 1] == 4)  # the step the time limit cut
    assert last.any()
    assert torch.allclose(tr.discount[last], torch.full_like(tr.discount[last], gamma))
    assert torch.all(tr.next_obs[last, 0] == tr.obs[last, 0])  # the true final obs, same episode

    _, ring = collect("fastrl-test/Terminating-v0", "sync", num_envs=2, steps=20, gamma=gamma)
    tr = all_transitions(ring)
    last = (tr.weight == 1) & (tr.next_obs[:, 1] == 3)
    assert last.any() and torch.all(tr.discount[last] == 0)
    mid = (tr.weight == 1) & (tr.next_obs[:, 1] < 3)
    assert torch.allclose(tr.discount[mid], torch.full_like(tr.discount[mid], gamma))


def test_nstep_window_stops_at_episode_end_with_real_envs():
    gamma, n = 0.5, 4
    _, ring = collect("fastrl-test/Terminating-v0", "sync", num_envs=1, steps=12, n_step=n, gamma=gamma)
    tr = all_transitions(ring)
    first = (tr.weight == 1) & (tr.obs[:, 1] == 0)  # starts of episodes (3 steps each)
    # A window from t=0 sums the 3 steps of the episode and stops at its termination.
    # rewards are t + 0.5 a for t = 1, 2, 3
    assert first.any() and torch.all(tr.discount[first] == 0)
    assert torch.all(tr.next_obs[first, 1] == 3) and torch.all(tr.next_obs[first, 0] == tr.obs[first, 0])
    assert torch.all(tr.returns[first] >= 1 + 0.5 * 2 + 0.25 * 3)


@pytest.mark.parametrize("env_id", ["fastrl-test/Mixed-v0", "LunarLander-v3"])
def test_all_backends_give_identical_transitions_and_episode_statistics(env_id):
    results = {name: collect(env_id, backend, seed=3, steps=150, num_workers=workers)
               for name, (backend, workers) in BACKENDS.items()}
    ref_collector, reference = results["async-plain"]
    ref_stats = ref_collector.pop_episodes()
    assert ref_stats[0], "the run must finish episodes"
    for name, (collector, ring) in results.items():
        assert ring.storage.obs.abs().sum() > 0
        for field, x, y in zip(ring.storage._fields, ring.storage, reference.storage):
            assert torch.equal(x, y), (name, field)
        if name != "async-plain":
            assert collector.pop_episodes() == ref_stats, name


def lockstep_and_ready_first(env_id, order, num_envs=4, workers=2, steps=60, seed=5):
    """The same per-env actions (a table [steps, N]) through plain AsyncVectorEnv in
    lockstep and through grouped workers acted on group by group: in a scripted `order`
    (a list of groups, each receiving its next step while the others are in flight), or
    as the workers get ready (order=None). Every group takes `steps` steps."""
    table = torch.randint(0, 2, (steps, num_envs), generator=torch.Generator().manual_seed(seed))
    reference = Collector(make_vector_env(env_id, num_envs, "async", None, num_envs), CPU)
    ref_ring = ReplayRing((steps + 1) * num_envs, num_envs, reference.obs_shape, CPU, n_step=3, gamma=0.9)
    ref_ring.start(reference.reset(seed=seed))
    for actions in table:
        reference.step_async(actions)
        step = reference.step_wait()
        ref_ring.add(actions, *step[1:], step.obs)
    reference.close()

    collector = Collector(make_vector_env(env_id, num_envs, "async", None, workers), CPU, ready_first=True)
    groups = collector.groups
    assert len(groups) == workers
    ring = ReplayRing((steps + 1) * num_envs, num_envs, collector.obs_shape, CPU, n_step=3, gamma=0.9,
                      groups=workers)
    ring.start(collector.reset(seed=seed))
    taken = [0] * workers
    for g, envs in enumerate(groups):
        collector.send(g, table[0, envs])
    most_apart = 0
    while min(taken) < steps:
        for g in ([order.pop(0)] if order is not None else collector.ready()):
            step = collector.receive(g)
            ring.add(table[taken[g], groups[g]], *step[1:], step.obs, g)
            taken[g] += 1
            if taken[g] < steps:
                collector.send(g, table[taken[g], groups[g]])
            most_apart = max(most_apart, max(taken) - min(taken))
    collector.close()
    return (reference, ref_ring), (collector, ring), most_apart


@pytest.mark.parametrize("env_id", ["fastrl-test/Mixed-v0", "LunarLander-v3"])
def test_ready_first_groups_give_each_env_the_lockstep_transitions(env_id):
    # Group 0 runs 30 steps ahead of group 1, then 10 behind it.
    order = [0, 0, 0, 0, 1] * 10 + [1] * 40 + [0] * 10 + [0, 1] * 10
    (ref, ref_ring), (got, ring), most_apart = lockstep_and_ready_first(env_id, order, steps=60)
    assert most_apart >= 30 and ring.heads == [ref_ring.head] * 2
    for field, x, y in zip(ring.storage._fields, ring.storage, ref_ring.storage):
        assert torch.equal(x, y), field
    # (return, length) per episode; the env steps counted when each ended follow the order of groups.
    ref_episodes = sorted(zip(*ref.pop_episodes()[:2]))
    assert ref_episodes and sorted(zip(*got.pop_episodes()[:2])) == ref_episodes


def test_ready_first_acts_on_the_workers_as_they_get_ready():
    (ref, ref_ring), (got, ring), _ = lockstep_and_ready_first("LunarLander-v3", None, num_envs=8, steps=100)
    for field, x, y in zip(ring.storage._fields, ring.storage, ref_ring.storage):
        assert torch.equal(x, y), field
    assert sorted(zip(*got.pop_episodes()[:2])) == sorted(zip(*ref.pop_episodes()[:2]))


def step_until_an_episode_ends(envs_by_name, rng, num_envs):
    """Steps every vector env with the same random actions until one of its envs ends an
    episode (so grouped workers hold an early reset); returns each one's last obs."""
    while True:
        actions = rng.integers(0, 2, num_envs)
        out = {name: envs.step(actions) for name, envs in envs_by_name.items()}
        if (out["async-plain"][2] | out["async-plain"][3]).any():
            return {name: o[0].copy() for name, o in out.items()}


@pytest.mark.parametrize("env_id, resets", [
    ("fastrl-test/Mixed-v0", [{}, {}]),  # reset depends on history (an episode counter)
    ("LunarLander-v3", [{}, {"options": {}}, {"seed": [None, 11, None, 13]}]),  # reset from args and RNG
])
def test_explicit_resets_after_an_episode_end_match_plain_async(env_id, resets):
    # Grouped workers reset ended envs early; a reset() that comes first must give what
    # the plain path gives: that very reset (no args), or a reset from the same RNG state.
    names = ("async-plain", "async-grouped")
    envs_by_name = {name: make_vector_env(env_id, 4, BACKENDS[name][0], num_workers=BACKENDS[name][1])
                    for name in names}
    rng = np.random.default_rng(0)
    try:
        first = {name: envs.reset(seed=5)[0].copy() for name, envs in envs_by_name.items()}
        assert np.array_equal(first["async-plain"], first["async-grouped"])
        for kwargs in resets:
            stepped = step_until_an_episode_ends(envs_by_name, rng, 4)
            assert np.array_equal(stepped["async-plain"], stepped["async-grouped"])
            after = {name: envs.reset(**kwargs)[0].copy() for name, envs in envs_by_name.items()}
            assert np.array_equal(after["async-plain"], after["async-grouped"]), kwargs
        for _ in range(30):  # and the envs go on alike, through more episode ends
            actions = rng.integers(0, 2, 4)
            obs = [envs.step(actions)[0].copy() for envs in envs_by_name.values()]
            assert np.array_equal(*obs)
    finally:
        for envs in envs_by_name.values():
            envs.close()


@pytest.mark.filterwarnings("error:.*ERROR")  # the worker's error is raised, not logged by gymnasium as well
@pytest.mark.parametrize("name", BACKENDS)
def test_a_failing_autoreset_fails_only_the_step_that_runs_it(name):
    # Grouped workers run autoresets early, but an error surfaces where the plain path's
    # does: at the next step, and not at all if a seeded reset() comes first.
    backend, workers = BACKENDS[name]
    envs = make_vector_env("fastrl-test/FailingReset-v0", 4, backend, num_workers=workers)
    actions = np.zeros(4, dtype=np.int64)
    try:
        envs.reset(seed=0)
        for _ in range(3 + 1 + 3):  # episode 0, its autoreset, episode 1: all fine
            envs.step(actions)
        obs, _ = envs.reset(seed=7)  # instead of the failing autoreset
        assert np.array_equal(obs[:, :2], np.tile([2, 0], (4, 1)))  # episode 2, t = 0
        for _ in range(3 + 1 + 3):
            envs.step(actions)
        with pytest.raises(RuntimeError, match="reset failed on purpose"):
            envs.step(actions)  # the failing autoreset, now that nothing comes first
    finally:
        envs.close(terminate=True)


def test_raw_step_messages_and_pickled_commands_share_a_pipe():
    # Grouped workers' steps travel as raw bytes; every other message is a pickle, shorter
    # or longer than a step message. Each must come out as it went in.
    sender, receiver = multiprocessing.Pipe()
    sent, got = StepRequest(4), StepRequest(4)
    sent.actions[:] = [0, 3, 128, 2**40]
    short, long = ("reset", {"seed": [1]}), ("reset", {"seed": list(range(100)), "options": None})
    sender.send_bytes(sent.buffer)
    sender.send(short)
    sender.send(long)
    assert receive(receiver, got.buffer) is None and got.actions.tolist() == [0, 3, 128, 2**40]
    assert receive(receiver, got.buffer) == short
    assert receive(receiver, got.buffer) == long


def test_a_grouped_worker_closes_cleanly_with_a_step_in_flight():
    # Ctrl-C between sending a step and recording it leaves that step's reply unread.
    # close() must collect it before the close messages (it is no close acknowledgement),
    # and the worker, still running its early resets, must exit cleanly.
    envs = make_vector_env("fastrl-test/SlowReset-v0", 2, "async", num_workers=1)
    envs.reset(seed=0)
    for _ in range(2):
        envs.step(np.zeros(2, dtype=np.int64))
    envs.step_async(np.zeros(2, dtype=np.int64))  # ends both episodes
    envs.close()
    assert envs.workers.processes[0].exitcode == 0


@pytest.mark.parametrize("name", ["sync", "async-grouped"])
def test_infos_match_plain_async(name):
    # Info-v0 reports {"t": t} on even steps only, so the `_t` masks matter.
    outputs = {}
    for key in ("async-plain", name):
        backend, workers = BACKENDS[key]
        envs = make_vector_env("fastrl-test/Info-v0", 4, backend, num_workers=workers)
        _, reset_info = envs.reset(seed=1)
        infos = [reset_info] + [envs.step(np.array([0, 1, 1, 0]))[4] for _ in range(9)]
        envs.close()
        outputs[key] = infos
    assert any("t" in info for info in outputs["async-plain"])
    for plain, other in zip(outputs["async-plain"], outputs[name]):
        assert plain.keys() == other.keys()
        for key in plain:
            assert np.array_equal(plain[key], other[key]), key


def test_episode_statistics_skip_reset_steps():
    collector, _ = collect("fastrl-test/Terminating-v0", "sync", num_envs=2, steps=17)
    returns, lengths, ends = collector.pop_episodes()
    # 17 steps per env = 4 episodes of 3 steps + 4 reset steps, with one step left over.
    assert lengths == [3] * 8
    # Each pair ends at vector step 3, 7, 11, 15 (of 2 envs): the env steps counted by then.
    assert ends == [6, 6, 14, 14, 22, 22, 30, 30]
    assert all(1 + 2 + 3 <= r <= 1 + 2 + 3 + 1.5 for r in returns)
    assert collector.pop_episodes() == ([], [], [])


def test_envpool_backend_has_the_same_autoreset_and_truncation_semantics():
    pytest.importorskip("envpool")
    gamma = 0.9
    collector, ring = collect("CartPole-v1", "envpool", num_envs=3, steps=60, gamma=gamma, seed=1,
                              env_kwargs={"max_episode_steps": 5})
    s = ring.storage
    rows = ring.size
    dones, valid = s.dones[:rows], s.valid[:rows]
    assert dones.any()
    # The step after every episode end, and only it, is a reset pseudo-step paying 0.
    assert torch.equal(valid[1:], ~dones[:-1])
    assert torch.all(s.rewards[:rows][~valid] == 0) and torch.all(s.rewards[:rows][valid] == 1)
    # It starts from the final observation (the state after the last real step), and
    # leads to a fresh reset state (CartPole resets within +-0.05).
    t, e = torch.nonzero(~valid[1:], as_tuple=True)
    t = t + 1
    assert torch.all(s.obs[t + 1, e].abs() <= 0.05)
    # No episode outlives the 5-step limit; cut episodes bootstrap with gamma.
    _, lengths, _ = collector.pop_episodes()
    assert lengths and max(lengths) == 5 and min(lengths) >= 1
    tr = all_transitions(ring)
    cut = (tr.weight == 1) & (s.dones[:rows] & ~s.terminated[:rows]).flatten()
    assert cut.any() and torch.allclose(tr.discount[cut], torch.full_like(tr.discount[cut], gamma))
    # Seeded like gymnasium: the same seed repeats the run.
    _, again = collect("CartPole-v1", "envpool", num_envs=3, steps=60, gamma=gamma, seed=1,
                       env_kwargs={"max_episode_steps": 5})
    assert all(torch.equal(x, y) for x, y in zip(ring.storage, again.storage))


def test_envpool_backend_refuses_what_it_cannot_run(monkeypatch):
    pytest.importorskip("envpool")
    with pytest.raises(ConfigError, match="EnvPool does not implement"):
        make_vector_env("fastrl-test/Mixed-v0", 2, "envpool")
    monkeypatch.setitem(sys.modules, "envpool", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match="backend='envpool' needs EnvPool: pip install envpool"):
        make_vector_env("CartPole-v1", 2, "envpool")


def test_an_envpool_error_is_an_env_error_with_its_traceback():
    """As on every other backend: one line naming the error, the traceback kept."""
    pytest.importorskip("envpool")
    envs = make_vector_env("CartPole-v1", 2, "envpool")
    collector = Collector(envs, CPU)
    collector.reset(seed=0)

    class Broken:
        def __init__(self, pool):
            self.pool = pool

        def send(self, actions):
            self.pool.send(actions)

        def recv(self):
            raise RuntimeError("the simulator stopped")

        def close(self):
            self.pool.close()

    envs.pool = Broken(envs.pool)
    collector.step_async(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(fastrl.EnvError, match=r"^an env raised RuntimeError: the simulator stopped$") as info:
        collector.step_wait()
    assert 'raise RuntimeError("the simulator stopped")' in info.value.trace
    collector.close()
