"""Batched n-step targets against a plain loop over the logical time series."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl.buffer import ReplayRing, transitions_at
from fastrl.returns import nstep_targets


def fill_ring(rows, num_envs, steps, n_step, gamma, rng, p_done):
    """Writes `steps` random vector steps; returns the ring and the full history."""
    ring = ReplayRing(capacity=(rows - 1) * num_envs, num_envs=num_envs, obs_shape=(2,),
                      device=torch.device("cpu"), n_step=n_step, gamma=gamma)
    assert ring.rows == rows
    obs = [rng.normal(size=(num_envs, 2)).astype(np.float32)]
    rew, term, done = [], [], []
    ring.start(torch.from_numpy(obs[0]))
    for _ in range(steps):
        r = rng.normal(size=num_envs).astype(np.float32)
        d = rng.random(num_envs) < p_done
        te = d & (rng.random(num_envs) < 0.5)
        tr = d & ~te
        o = rng.normal(size=(num_envs, 2)).astype(np.float32)
        ring.add(torch.from_numpy(rng.integers(0, 3, num_envs)), torch.from_numpy(r),
                 torch.from_numpy(te), torch.from_numpy(tr), torch.from_numpy(o))
        obs.append(o), rew.append(r), term.append(te), done.append(d)
    return ring, np.array(obs), np.array(rew), np.array(term), np.array(done)


def naive_target(obs, rew, term, done, tau, env, steps_written, n, gamma):
    """Plain loop from absolute time `tau` (history, not ring layout)."""
    G, m, terminal = 0.0, 0, False
    for k in range(n):
        if tau + k >= steps_written:  # the write head
            break
        G += gamma ** k * rew[tau + k, env]
        m = k + 1
        if done[tau + k, env]:
            terminal = bool(term[tau + k, env])
            break
    discount = 0.0 if terminal else gamma ** m
    valid = tau == 0 or not done[tau - 1, env]
    return G, discount, obs[tau + m, env], valid


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 12), num_envs=st.integers(1, 3), extra=st.integers(0, 30),
       n_step=st.integers(1, 6), p_done=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       gamma=st.sampled_from([0.5, 0.9, 1.0]), seed=st.integers(0, 10_000))
def test_ring_nstep_matches_naive_loop(rows, num_envs, extra, n_step, p_done, gamma, seed):
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, rows) + extra  # sometimes not full, often wrapped several times
    ring, obs, rew, term, done = fill_ring(rows, num_envs, steps, n_step, gamma, rng, p_done)
    assert ring.size == min(steps, rows - 1)
    ages = torch.arange(1, ring.size + 1).repeat_interleave(num_envs)
    envs = torch.arange(num_envs).repeat(ring.size)
    start = torch.remainder(ring.head - ages, ring.rows)
    got = transitions_at(ring.storage, start, envs, ages, n_step, gamma)
    for j in range(len(ages)):
        tau = steps - int(ages[j])
        G, disc, next_obs, valid = naive_target(obs, rew, term, done, tau, int(envs[j]), steps, n_step, gamma)
        assert abs(got.returns[j].item() - G) < 1e-4, (j, tau)
        assert abs(got.discount[j].item() - disc) < 1e-6
        np.testing.assert_array_equal(got.next_obs[j].numpy(), next_obs)
        np.testing.assert_array_equal(got.obs[j].numpy(), obs[tau, int(envs[j])])
        assert got.weight[j].item() == float(valid)


def test_episode_end_at_every_window_position():
    """One window of length n with its single done at each position k, both kinds."""
    n, gamma = 5, 0.9
    r = torch.arange(1.0, n + 1).expand(2 * n, n).clone()
    dones = torch.zeros(2 * n, n, dtype=torch.bool)
    term = torch.zeros(2 * n, n, dtype=torch.bool)
    for k in range(n):
        dones[k, k] = dones[n + k, k] = True
        term[k, k] = True  # first n rows terminate at k, the rest truncate at k
    out = nstep_targets(r, dones, term, torch.full((2 * n,), n), gamma)
    for i in range(2 * n):
        k = i % n
        assert out.steps[i].item() == k + 1
        assert abs(out.returns[i].item() - sum(gamma ** j * (j + 1) for j in range(k + 1))) < 1e-5
        expected_discount = 0.0 if i < n else gamma ** (k + 1)
        assert abs(out.discount[i].item() - expected_discount) < 1e-6


def test_horizon_stops_window_at_write_head():
    r = torch.ones(1, 4)
    no = torch.zeros(1, 4, dtype=torch.bool)
    out = nstep_targets(r, no, no, torch.tensor([2]), 0.5)
    assert out.steps.item() == 2 and abs(out.returns.item() - 1.5) < 1e-6
    assert abs(out.discount.item() - 0.25) < 1e-6


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 10), groups=st.integers(2, 3), group_size=st.integers(1, 2), n_step=st.integers(1, 4),
       p_done=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 10_000))
def test_grouped_ring_keeps_a_write_head_per_group(rows, groups, group_size, n_step, p_done, seed):
    """Groups of envs written out of step (ready-first collection): every group's windows
    stop at its own head, and sampling draws only complete rows of each group."""
    rng, gamma, G = np.random.default_rng(seed), 0.9, group_size
    N = groups * G
    ring = ReplayRing(capacity=(rows - 1) * N, num_envs=N, obs_shape=(2,), device=torch.device("cpu"),
                      n_step=n_step, gamma=gamma, groups=groups)
    first = rng.normal(size=(N, 2)).astype(np.float32)
    ring.start(torch.from_numpy(first))
    history = [dict(obs=[first[g * G:(g + 1) * G]], rew=[], term=[], done=[]) for g in range(groups)]
    order = rng.permutation(np.repeat(np.arange(groups), rng.integers(1, 3 * rows, groups)))
    for g in order.tolist():
        h = history[g]
        r = rng.normal(size=G).astype(np.float32)
        d = rng.random(G) < p_done
        te = d & (rng.random(G) < 0.5)
        o = rng.normal(size=(G, 2)).astype(np.float32)
        ring.add(torch.from_numpy(rng.integers(0, 3, G)), torch.from_numpy(r), torch.from_numpy(te),
                 torch.from_numpy(d & ~te), torch.from_numpy(o), group=g)
        h["obs"].append(o), h["rew"].append(r), h["term"].append(te), h["done"].append(d)
    assert ring.size == min(min(len(h["rew"]) for h in history), rows - 1)

    expected = {}  # obs of a complete row -> (return, discount, next obs, weight)
    for g, h in enumerate(history):
        steps, size = len(h["rew"]), min(len(h["rew"]), rows - 1)
        obs, rew, term, done = (np.array(h[k]) for k in ("obs", "rew", "term", "done"))
        ages = torch.arange(1, size + 1).repeat_interleave(G)
        envs = torch.arange(G).repeat(size)
        start = torch.remainder(ring.heads[g] - ages, ring.rows)
        got = transitions_at(ring.storage, start, envs + g * G, ages, n_step, gamma)
        for j in range(len(ages)):
            tau, env = steps - int(ages[j]), int(envs[j])
            G_, disc, next_obs, valid = naive_target(obs, rew, term, done, tau, env, steps, n_step, gamma)
            assert abs(got.returns[j].item() - G_) < 1e-4 and abs(got.discount[j].item() - disc) < 1e-6
            np.testing.assert_array_equal(got.next_obs[j].numpy(), next_obs)
            np.testing.assert_array_equal(got.obs[j].numpy(), obs[tau, env])
            assert got.weight[j].item() == float(valid)
            expected[tuple(obs[tau, env].tolist())] = (G_, disc, tuple(next_obs.tolist()), float(valid))

    torch.manual_seed(seed)
    sample = ring.sample(300)
    for j in range(300):
        G_, disc, next_obs, weight = expected[tuple(sample.obs[j].tolist())]  # a complete row, none other
        assert abs(sample.returns[j].item() - G_) < 1e-4 and abs(sample.discount[j].item() - disc) < 1e-6
        assert tuple(sample.next_obs[j].tolist()) == next_obs and sample.weight[j].item() == weight


def test_sampling_is_uniform_over_transitions_when_groups_hold_different_row_counts():
    """Ready-first groups written out of step (here 10 rows against 4): every transition
    offered is equally likely, rather than a group's rows drawn the more often the fewer it holds."""
    G, written = 2, (10, 4)
    ring = ReplayRing(capacity=15 * 2 * G, num_envs=2 * G, obs_shape=(1,), device=torch.device("cpu"), groups=2)
    ident = 1000 * torch.arange(2).repeat_interleave(G) + 100 * torch.arange(2 * G)  # env e of group g: 1000 g + 100 e
    ring.start(ident.float().unsqueeze(1))  # so the obs of row k of an env is its ident + k
    zeros, no = torch.zeros(G), torch.zeros(G, dtype=torch.bool)
    for g, steps in enumerate(written):
        for k in range(1, steps + 1):
            ring.add(torch.zeros(G, dtype=torch.int64), zeros, no, no, (ident[g * G:(g + 1) * G] + k).float()[:, None],
                     group=g)
    # Each env offers its newest 4 complete rows (as many as the group a step behind holds).
    offered = {int(ident[e]) + k for e in range(2 * G) for k in range(written[e // G] - 4, written[e // G])}

    torch.manual_seed(0)
    got = torch.cat([ring.sample(4_000).obs.flatten() for _ in range(12)]).long()
    values, counts = torch.unique(got, return_counts=True)
    assert set(values.tolist()) == offered
    expected = len(got) / len(offered)  # 3,000 each; the binomial spread is about 53
    assert counts.min() > expected - 300 and counts.max() < expected + 300, counts.tolist()


def test_the_ring_names_the_fields_holding_a_nan_or_an_infinity_in_any_row():
    # Rows of 2**21 values: the scan goes 8 rows at a time, so the bad values sit in its
    # last chunk, past the first.
    ring = ReplayRing(capacity=9 * 2, num_envs=2, obs_shape=(2**20,), device=torch.device("cpu"))
    ring.start(torch.zeros(2, 2**20))
    for _ in range(ring.rows - 1):
        ring.add(torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.zeros(2, dtype=torch.bool),
                 torch.zeros(2, dtype=torch.bool), torch.ones(2, 2**20))
    assert ring.nonfinite_fields() == []
    ring.storage.obs[ring.rows - 1, 1, -1] = float("nan")
    assert ring.nonfinite_fields() == ["obs"]
    ring.storage.rewards[ring.rows - 1, 0] = -float("inf")
    assert ring.nonfinite_fields() == ["obs", "rewards"]
