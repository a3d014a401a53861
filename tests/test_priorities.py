"""Prioritised replay against plain loops: which slots a draw picks, their importance-
sampling weights, the priorities a learning step writes, and those the ring gives new
steps, reset pseudo-steps and the rows being written."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastrl
from fastrl.algos import ddqn
from fastrl.buffer import ReplayRing, transitions_at
from fastrl.optim import Adam
from fastrl.priorities import Priorities

CPU = torch.device("cpu")


def random_priorities(rows=37, envs=6, seed=0) -> Priorities:
    gen = torch.Generator().manual_seed(seed)
    pr = Priorities(rows, envs, CPU, alpha=0.6, beta=0.4)
    pr.p.copy_(torch.rand(rows, envs, generator=gen) * (torch.rand(rows, envs, generator=gen) > 0.3))
    pr.row_sums.copy_(pr.p.sum(1))
    return pr


def plain_draw(p: np.ndarray, u: float) -> tuple[int, int]:
    """The slot whose span, laid out row by row, holds u."""
    end = 0.0
    for row in range(p.shape[0]):
        for env in range(p.shape[1]):
            end += float(p[row, env])
            if u < end:
                return row, env
    raise AssertionError("u beyond the total")


def test_a_draw_is_the_slot_whose_span_holds_a_uniform_number_and_weighs_it_by_importance():
    pr = random_priorities()
    pr.beta.fill_(0.7)
    pr.reserve(2000)
    torch.manual_seed(3)
    row, env, weight = pr.draw(2000)
    torch.manual_seed(3)  # the same uniform numbers, as draw() makes them
    u = torch.rand(2000, dtype=torch.float64) * pr.p.double().sum()
    p = pr.p.double().numpy()
    assert [plain_draw(p, x) for x in u.tolist()] == list(zip(row.tolist(), env.tolist()))
    drawn = p[row.numpy(), env.numpy()]
    assert drawn.min() > 0  # slots of p = 0 are never drawn
    assert np.allclose(weight.numpy(), [(x / drawn.min()) ** -0.7 for x in drawn], rtol=1e-5)
    assert torch.equal(pr.drawn_row, row) and torch.equal(pr.drawn_env, env)


def test_draws_follow_the_priorities():
    pr = random_priorities(rows=5, envs=4, seed=1)
    pr.reserve(200_000)
    torch.manual_seed(0)
    row, env, _ = pr.draw(200_000)
    counts = np.bincount((row * 4 + env).numpy(), minlength=20) / 200_000
    expected = (pr.p / pr.p.sum()).flatten().numpy()
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected / 200_000) + 1e-9)


def test_learning_writes_each_drawn_slots_td_error_as_its_priority():
    pr = random_priorities()
    pr.reserve(64)
    torch.manual_seed(5)
    row, env, _ = pr.draw(64)
    before = pr.p.clone()
    td = torch.randn(64) * 3
    learned = torch.rand(64) > 0.2
    pr.learned(td, learned)
    expected = before.clone()
    for i in range(64):
        expected[row[i], env[i]] = (abs(td[i]) + pr.eps) ** pr.alpha if learned[i] else 0.0
    assert torch.allclose(pr.p, expected)
    assert torch.allclose(pr.row_sums, pr.p.double().sum(1))
    assert pr.max_p.item() == pytest.approx(max(1.0, float(expected.max())))


def test_the_ring_gives_new_steps_the_largest_priority_and_none_to_reset_steps_and_rows_in_writing():
    ring = ReplayRing(capacity=24, num_envs=4, obs_shape=(1,), device=CPU, groups=2, per_alpha=0.5)
    pr = ring.priorities
    ring.start(torch.zeros(4, 1))
    gen = torch.Generator().manual_seed(0)
    for step in range(40):  # wraps around; the two groups out of step (ready-first)
        for g in ([0, 1] if step % 3 else [0]):
            done = torch.rand(2, generator=gen) < 0.3
            pr.max_p.fill_(1.0 + step)  # as if learning had raised it
            ring.add(torch.zeros(2, dtype=torch.long), torch.ones(2), done, torch.zeros(2, dtype=torch.bool),
                     torch.zeros(2, 1), group=g)
            t = (ring.written[g] - 1) % ring.rows
            cols = slice(2 * g, 2 * g + 2)
            valid = ring.storage.valid[t, cols]
            assert torch.equal(pr.p[t, cols], torch.where(valid, 1.0 + step, 0.0))
            assert torch.all(pr.p[ring.heads[g], cols] == 0)  # the row its next step completes
            assert torch.allclose(pr.row_sums, pr.p.double().sum(1))
    saved = ring.state_dict()
    again = ReplayRing(capacity=24, num_envs=4, obs_shape=(1,), device=CPU, groups=2, per_alpha=0.5)
    again.load_state_dict(saved)
    assert torch.equal(again.priorities.p, pr.p) and again.priorities.max_p == pr.max_p
    assert torch.equal(again.priorities.row_sums, pr.row_sums)


def test_the_ring_samples_the_drawn_slots_transitions_weighted_by_importance():
    ring = ReplayRing(capacity=60, num_envs=3, obs_shape=(2,), device=CPU, n_step=3, gamma=0.9, per_alpha=0.6)
    ring.start(torch.randn(3, 2))
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        ring.add(torch.randint(0, 2, (3,), generator=gen), torch.randn(3, generator=gen),
                 torch.rand(3, generator=gen) < 0.2, torch.rand(3, generator=gen) < 0.05,
                 torch.randn(3, 2, generator=gen))
    ring.priorities.p.mul_(torch.rand(ring.rows, 3, generator=gen))  # unequal priorities
    ring.priorities.row_sums.copy_(ring.priorities.p.sum(1))
    sample = ring.sampler(256)
    torch.manual_seed(2)
    batch = sample()
    torch.manual_seed(2)
    row, env, weight = ring.priorities.draw(256)
    age = torch.remainder(ring.head - row, ring.rows)
    assert age.min() >= 1  # never the row in writing
    plain = transitions_at(ring.storage, row, env, age, 3, 0.9)
    for name in ("obs", "actions", "returns", "next_obs", "discount"):
        assert torch.equal(getattr(batch, name), getattr(plain, name)), name
    assert torch.equal(batch.weight, plain.weight * weight)


@pytest.mark.parametrize("mode", ["eager", pytest.param("compile", marks=pytest.mark.slow)])
def test_a_learning_step_writes_the_batchs_td_errors_before_its_update(mode):
    """One learn step on a prioritised ring: the drawn slots' new priorities are the TD
    errors of the network that learned from them, before its update."""
    torch.manual_seed(0)
    ring = ReplayRing(capacity=400, num_envs=4, obs_shape=(3,), device=CPU, n_step=2, gamma=0.9, per_alpha=0.6)
    ring.start(torch.randn(4, 3))
    for _ in range(90):
        ring.add(torch.randint(0, 2, (4,)), torch.randn(4), torch.rand(4) < 0.1, torch.zeros(4, dtype=torch.bool),
                 torch.randn(4, 3))
    q = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    q_target = copy.deepcopy(q).requires_grad_(False)
    learn = ddqn.make_learn_step(ring.sampler(32), q, q_target, Adam(q, 1e-2), 0.1, 1, mode,
                                 priorities=ring.priorities)
    learn()  # a compiled step compiles on its first call
    before = copy.deepcopy(q)
    target_before = copy.deepcopy(q_target)
    torch.manual_seed(7)
    learn()
    pr = ring.priorities
    row, env = pr.drawn_row, pr.drawn_env
    age = torch.remainder(ring.head - row, ring.rows)
    batch = transitions_at(ring.storage, row, env, age, 2, 0.9)
    with torch.no_grad():
        y = ddqn.double_dqn_targets(before, target_before, batch)
        q_sa = before(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    for i in range(32):
        expected = (abs(float(y[i] - q_sa[i])) + pr.eps) ** pr.alpha if batch.weight[i] > 0 else 0.0
        assert pr.p[row[i], env[i]].item() == pytest.approx(expected, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(q.parameters(), before.parameters()))


def test_bad_prioritised_replay_settings_are_one_line_errors():
    for values, text in [({"per_alpha": -0.5}, "invalid per_alpha=-0.5"), ({"per_beta": 1.5}, "invalid per_beta=1.5")]:
        with pytest.raises(fastrl.ConfigError, match=text):
            fastrl.make_config(**values)
