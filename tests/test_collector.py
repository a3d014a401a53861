"""Autoreset, truncation and termination through the real vector envs into the ring."""
import pytest
import torch

from fastrl.buffer import ReplayRing, transitions_at
from fastrl.collector import Collector
from fastrl.envs import make_vector_env

CPU = torch.device("cpu")


def collect(env_id, backend, num_envs=3, steps=40, n_step=1, gamma=0.9, seed=0, capacity=None):
    collector = Collector(make_vector_env(env_id, num_envs, backend), CPU)
    ring = ReplayRing(capacity or (steps + 1) * num_envs, num_envs, (3,), CPU, n_step, gamma)
    obs = collector.reset(seed=seed)
    ring.start(obs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        actions = torch.randint(0, 2, (num_envs,), generator=gen)
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


@pytest.mark.parametrize("backend", ["sync", "async"])
def test_reset_steps_are_masked_and_real_steps_are_consistent(backend):
    _, ring = collect("fastrl-test/Mixed-v0", backend)
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


def test_sync_and_async_backends_give_identical_transitions():
    _, a = collect("fastrl-test/Mixed-v0", "sync", seed=3)
    _, b = collect("fastrl-test/Mixed-v0", "async", seed=3)
    for x, y in zip(a.storage, b.storage):
        assert torch.equal(x, y)


def test_episode_statistics_skip_reset_steps():
    collector, _ = collect("fastrl-test/Terminating-v0", "sync", num_envs=2, steps=17)
    returns, lengths = collector.pop_episodes()
    # 17 steps per env = 4 episodes of 3 steps + 4 reset steps, with one step left over.
    assert lengths == [3] * 8
    assert all(1 + 2 + 3 <= r <= 1 + 2 + 3 + 1.5 for r in returns)
    assert collector.pop_episodes() == ([], [])
