"""Double-DQN maths against hand computations; ring capacity; reset steps carry no gradient."""
import copy

import numpy as np
import pytest
import torch
from by_hand import Table
from torch import nn

from fastrl.algos import ddqn
from fastrl.buffer import ReplayRing, Transitions
from fastrl.optim import Adam
from fastrl.run.logs import DeviceMeans
from fastrl.schedules import linear_schedule


def batch(next_obs, returns, discount, obs=None, actions=None, weight=None):
    b = len(returns)
    return Transitions(
        obs=torch.tensor(obs if obs is not None else next_obs, dtype=torch.float32),
        actions=torch.tensor(actions if actions is not None else [0] * b),
        returns=torch.tensor(returns, dtype=torch.float32),
        next_obs=torch.tensor(next_obs, dtype=torch.float32),
        discount=torch.tensor(discount, dtype=torch.float32),
        weight=torch.tensor(weight if weight is not None else [1.0] * b),
    )


def test_double_dqn_target_matches_hand_computation():
    online = Table([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])      # 3 actions, 2-d obs
    target = Table([[10.0, 0.0], [0.0, -10.0], [1.0, 1.0]])
    s2 = [[2.0, 1.0], [0.0, 3.0]]
    b = batch(s2, returns=[1.0, -1.0], discount=[0.9, 0.0])
    y = ddqn.double_dqn_targets(online, target, b)
    # sample 0: online Q(s') = [2, 1, 1.5] -> a* = 0; target Q(s', 0) = 20 -> 1 + 0.9 * 20
    # (vanilla DQN would take max target = 20 here too, so sample 1 tells them apart)
    # sample 1: online Q(s') = [0, 3, 1.5] -> a* = 1; target Q(s', 1) = -30; discount 0 -> -1
    assert torch.allclose(y, torch.tensor([19.0, -1.0]))
    b = batch([[0.0, 3.0]], returns=[0.0], discount=[1.0])
    # online picks action 1 (target value -30) although target's own max is action 2 (3.0)
    assert torch.allclose(ddqn.double_dqn_targets(online, target, b), torch.tensor([-30.0]))


def test_reset_pseudo_transitions_carry_no_gradient():
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    q_t = copy.deepcopy(q)
    obs = torch.randn(6, 2)
    common = dict(next_obs=obs.tolist(), discount=[0.9] * 6, obs=obs.tolist(), actions=[0, 1, 0, 1, 0, 1])
    clean = batch(returns=[1.0] * 6, weight=[1, 1, 1, 0, 1, 0], **common)
    garbage = batch(returns=[1.0, 1.0, 1.0, 1e6, 1.0, -1e6], weight=[1, 1, 1, 0, 1, 0], **common)
    grads = []
    for b in (clean, garbage):
        q.zero_grad()
        loss, _ = ddqn.td_loss(q, b, ddqn.double_dqn_targets(q, q_t, b))
        loss.backward()
        grads.append([p.grad.clone() for p in q.parameters()])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_update_moves_q_towards_target_and_target_update_rules():
    torch.manual_seed(0)
    q = Table([[0.0, 0.0], [0.0, 0.0]])
    q_t = copy.deepcopy(q).requires_grad_(False)
    update = ddqn.make_learn_step(lambda: b, q, q_t, Adam(q, lr=0.1, max_grad_norm=10.0), tau=0.5,
                                  target_update_interval=1)
    b = batch([[1.0, 0.0]], returns=[1.0], discount=[0.0], obs=[[1.0, 0.0]], actions=[0])
    stats = update()
    assert stats.loss.item() == 0.5  # Huber(0 - 1) = 0.5
    assert q.w[0, 0].item() > 0 and q.w[1, 0].item() == 0  # only the taken action moved
    assert torch.allclose(q_t.w, 0.5 * q.w.detach())  # the step ends with the Polyak update
    ddqn.update_target(q_t, q, tau=1.0)
    assert torch.equal(q_t.w, q.w.detach())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_learn_step_updates_the_target_on_schedule(mode):
    """Polyak every step, or a hard copy every 3rd step: inside the (compiled) step, by the
    optimizer's device-side step count, as the naive host-side loop would."""
    gen = torch.Generator().manual_seed(0)
    fixed = Transitions(obs=torch.randn(16, 2, generator=gen), actions=torch.randint(0, 2, (16,), generator=gen),
                        returns=torch.randn(16, generator=gen), next_obs=torch.randn(16, 2, generator=gen),
                        discount=torch.full((16,), 0.9), weight=torch.ones(16))
    for tau, interval in ((0.1, 1), (1.0, 3)):
        torch.manual_seed(0)
        q = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        q_t = copy.deepcopy(q).requires_grad_(False)
        expected = [p.detach().clone() for p in q_t.parameters()]
        learn = ddqn.make_learn_step(lambda: fixed, q, q_t, Adam(q, 1e-2), tau, interval, mode)
        for update in range(1, 8):
            learn()
            if update % interval == 0:  # the naive loop
                expected = [(1 - tau) * e + tau * p.detach() for e, p in zip(expected, q.parameters())]
            for e, t in zip(expected, q_t.parameters()):
                assert torch.allclose(t, e, rtol=1e-6, atol=1e-7), (tau, interval, update)
            if interval > 1:  # lerp by 0 and 1 is exact: untouched between copies, then equal
                online = list(q.parameters())
                assert all(torch.equal(t, e) for t, e in zip(q_t.parameters(), expected))
                assert all(torch.equal(t, p) for t, p in zip(q_t.parameters(), online)) == (update % interval == 0)


def test_epsilon_greedy_and_schedule():
    q = Table([[1.0, 0.0], [0.0, 1.0]])
    act = ddqn.make_act(q)
    obs = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 50)
    greedy = act(obs, torch.tensor(0.0))
    assert torch.equal(greedy, torch.tensor([0, 1] * 50))
    torch.manual_seed(0)
    random = act(obs, torch.tensor(1.0))
    assert 0.3 < (random != greedy).float().mean() < 0.7
    assert linear_schedule(0, 1.0, 0.1, 100) == 1.0
    assert abs(linear_schedule(50, 1.0, 0.1, 100) - 0.55) < 1e-12
    assert linear_schedule(500, 1.0, 0.1, 100) == 0.1


def test_ring_capacity_wraparound_and_uniform_sampling():
    ring = ReplayRing(capacity=20, num_envs=2, obs_shape=(1,), device=torch.device("cpu"))
    assert ring.rows == 11 and len(ring) == 0
    ring.start(torch.zeros(2, 1))
    for step in range(1, 26):
        ring.add(torch.zeros(2, dtype=torch.long), torch.full((2,), float(step)),
                 torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool),
                 torch.full((2, 1), float(step)))
        assert ring.size == min(step, 10) and len(ring) == 2 * ring.size
    assert ring.head == 25 % 11
    # Only the 10 newest steps (16..25) remain; older rows were overwritten in place.
    torch.manual_seed(0)
    rewards = ring.sample(4000).returns
    values, counts = np.unique(rewards.numpy(), return_counts=True)
    assert set(values.tolist()) == set(float(s) for s in range(16, 26))
    assert counts.min() > 0.7 * counts.mean()  # roughly uniform over the stored rows


def _learner_after_updates(mode, device, updates=6):
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    q_t = copy.deepcopy(q).requires_grad_(False)
    optimizer = Adam(q, 1e-2, max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(1)
    fixed = Transitions(obs=torch.randn(64, 4, generator=gen), actions=torch.randint(0, 3, (64,), generator=gen),
                        returns=torch.randn(64, generator=gen), next_obs=torch.randn(64, 4, generator=gen),
                        discount=torch.full((64,), 0.9), weight=torch.ones(64))
    fixed = Transitions(*(t.to(device) for t in fixed))
    learn = ddqn.make_learn_step(lambda: fixed, q, q_t, optimizer, 0.05, 1, mode)
    losses = [learn().loss.item() for _ in range(updates)]
    return [p.detach().cpu() for p in (*q.parameters(), *q_t.parameters())], losses


@pytest.mark.slow
def test_learner_modes_change_speed_not_maths():
    eager, eager_losses = _learner_after_updates("eager", torch.device("cpu"))
    compiled, compiled_losses = _learner_after_updates("compile", torch.device("cpu"))
    assert eager_losses[-1] < eager_losses[0]
    assert np.allclose(eager_losses, compiled_losses, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_compiled_step_draws_the_same_batches_from_the_ring_as_the_eager_one():
    gen = torch.Generator().manual_seed(3)
    ring = ReplayRing(400, 4, (4,), torch.device("cpu"), n_step=3)
    ring.start(torch.randn(4, 4, generator=gen))
    for _ in range(150):
        ring.add(torch.randint(0, 3, (4,), generator=gen), torch.randn(4, generator=gen),
                 torch.rand(4, generator=gen) < 0.05, torch.rand(4, generator=gen) < 0.02,
                 torch.randn(4, 4, generator=gen))
    runs = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        q = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
        q_t = copy.deepcopy(q).requires_grad_(False)
        learn = ddqn.make_learn_step(ring.sampler(16), q, q_t, Adam(q, 1e-2, max_grad_norm=1.0), 0.05, 1, mode)
        torch.manual_seed(1)  # the draws: 16 of 600 transitions per update, n-step windows
        runs[mode] = [learn().q_mean.item() for _ in range(12)], [p.detach().clone() for p in q.parameters()]
    (eager_q, eager_params), (compiled_q, compiled_params) = runs["eager"], runs["compile"]
    assert len(set(eager_q)) == 12  # each update learned from a batch of its own
    assert np.allclose(eager_q, compiled_q, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager_params, compiled_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_learner_replays_the_same_updates_without_host_syncs():
    cuda = torch.device("cuda")
    compiled, compiled_losses = _learner_after_updates("compile", cuda, updates=8)
    graphed, graphed_losses = _learner_after_updates("cudagraphs", cuda, updates=8)  # 3 warm-up, record, replays
    assert np.allclose(compiled_losses, graphed_losses, rtol=1e-4, atol=1e-6)
    for a, b in zip(compiled, graphed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # The training loop's learner body (sample from a device ring, update, metrics) never waits on the host.
    ring = ReplayRing(1000, 4, (4,), cuda, n_step=3)
    ring.start(torch.zeros(4, 4, device=cuda))
    for _ in range(300):
        ring.add(torch.randint(0, 3, (4,), device=cuda), torch.randn(4, device=cuda), torch.rand(4, device=cuda) < 0.05,
                 torch.zeros(4, dtype=torch.bool, device=cuda), torch.randn(4, 4, device=cuda))
    q = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)).to(cuda)
    q_t = copy.deepcopy(q).requires_grad_(False)
    optimizer = Adam(q, 1e-3, max_grad_norm=10.0)
    stats = DeviceMeans(("loss", "q", "g"), cuda)
    for mode in ("compile", "cudagraphs"):
        learn = ddqn.make_learn_step(ring.sampler(32), q, q_t, optimizer, 0.005, 2, mode)
        for _ in range(5):  # compile and record first
            stats.add(learn())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                stats.add(learn())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert np.isfinite(stats.read()["loss"])
