"""REINFORCE: batched Monte-Carlo returns, carry-over across rollouts, learning."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl
from fastrl.algos import reinforce
from fastrl.buffer import RolloutBuffer
from fastrl.collector import Collector
from fastrl.envs import make_vector_env
from fastrl.nets import PolicyNetwork
from fastrl.optim import Adam
from fastrl.returns import discounted_returns

CPU = torch.device("cpu")


def naive_episode_returns(rewards, dones, gamma):
    """Per env, split the series into episodes and sum each one's discounted rewards."""
    T, N = rewards.shape
    G = np.full((T, N), np.nan)
    for i in range(N):
        start = 0
        for t in range(T):
            if dones[t, i]:
                episode = rewards[start:t + 1, i]
                for k in range(len(episode)):
                    G[start + k, i] = sum(gamma ** j * r for j, r in enumerate(episode[k:]))
                start = t + 1
    return G  # nan where the episode has not ended inside the window


@settings(max_examples=80, deadline=None)
@given(T=st.integers(1, 70), N=st.integers(1, 4), p_done=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]), seed=st.integers(0, 10_000))
def test_discounted_returns_match_per_episode_loop(T, N, p_done, gamma, seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N))
    dones = rng.random((T, N)) < p_done
    G, complete = discounted_returns(torch.from_numpy(rewards), torch.from_numpy(dones), gamma)
    expected = naive_episode_returns(rewards, dones, gamma)
    np.testing.assert_array_equal(complete.numpy(), ~np.isnan(expected))
    np.testing.assert_allclose(G.numpy()[complete.numpy()], expected[~np.isnan(expected)], atol=1e-9)


def test_episode_spanning_rollouts_is_carried_over_and_completed():
    """Rollouts of 4 steps, episodes of 10 steps: each episode crosses two boundaries,
    and its first step is learned from only when the episode has ended, with the full return."""
    gamma = 0.9
    collector = Collector(make_vector_env("fastrl-test/Terminating-v0", 2, "sync",
                                          {"length": 10, "max_episode_steps": 20}), CPU)
    buffer = RolloutBuffer(rows=4 + 20 + 2, num_envs=2, obs_shape=(3,), device=CPU)
    buffer.start(collector.reset(seed=0))
    learned_returns, learned_t = [], []
    for rollout in range(8):
        for _ in range(4):
            actions = torch.zeros(2, dtype=torch.long)
            collector.step_async(actions)
            step = collector.step_wait()
            buffer.add(actions, step.rewards, step.terminated, step.truncated, step.obs)
        batch = buffer.episodes(gamma)
        if rollout < 2:  # 8 steps in: no episode has ended, nothing to learn yet
            assert not batch.mask.any()
        learned_returns.append(batch.returns[batch.mask])
        learned_t.append(batch.obs[batch.mask, 1])
        buffer.mark_learned(batch)
    collector.close()
    returns, t = torch.cat(learned_returns), torch.cat(learned_t)
    # 32 steps per env = 3 episodes of 10 steps + 2 reset steps; every step learned once.
    assert sorted(t.tolist()) == sorted(list(range(10)) * 6)
    for step_t, g in zip(t.tolist(), returns.tolist()):
        expected = sum(gamma ** k * r for k, r in enumerate(range(int(step_t) + 1, 11)))
        assert abs(g - expected) < 1e-4  # the full return to the episode's end, never cut


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(3, 12), N=st.integers(1, 3), batch_size=st.integers(1, 20), p_done=st.sampled_from([0.1, 0.4]),
       writes=st.lists(st.integers(0, 6), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_each_batch_is_the_oldest_ready_steps_and_each_step_is_learned_once(rows, N, batch_size, p_done, writes,
                                                                            seed):
    """A plain loop over the ring, oldest row first, picks what the next batch must hold:
    the first `batch_size` steps of ended episodes not learned before, with their full
    returns. Catches a batch out of time order, a step learned twice or skipped while
    its row is still there, and a mark_learned that touches steps outside the batch. Steps
    written over before they were learned are counted (take_lost) as a ledger of step
    numbers finds them: pending from when they are written (unless they follow a done,
    the reset's pseudo-step), learned when a batch holds them, lost when still pending
    `rows - 1` steps later."""
    gamma = 0.9
    rng = np.random.default_rng(seed)
    buffer = RolloutBuffer(rows, N, (2,), CPU, batch_size=batch_size)
    buffer.start(torch.zeros(N, 2))
    step = 0
    pending, lost, was_done = set(), 0, np.zeros(N, dtype=bool)  # the ledger: (step, env)
    for n_writes in writes:
        for _ in range(n_writes):  # obs carry the step's count, so each step is recognisable
            step += 1
            lost += sum((step - buffer.rows + 1, e) in pending for e in range(N))
            pending -= {(step - buffer.rows + 1, e) for e in range(N)}
            done = torch.from_numpy(rng.random(N) < p_done)
            pending |= {(step, e) for e in range(N) if not was_done[e]}
            was_done = done.numpy()
            buffer.record_log_probs(torch.full((N,), -float(step)))
            buffer.add(torch.from_numpy(rng.integers(0, 3, N)), torch.from_numpy(rng.normal(size=N)).float(),
                       done & torch.from_numpy(rng.random(N) < 0.5), done, torch.full((N, 2), float(step)))
        time_order = [(buffer.head + 1 + k) % buffer.rows for k in range(buffer.rows - 1)]
        s = buffer.storage
        rewards = s.rewards[time_order].double().numpy()
        G = naive_episode_returns(rewards, s.dones[time_order].numpy(), gamma)
        valid, learned = s.valid[time_order].numpy(), buffer.learned[time_order].numpy().copy()
        ready = [(t, e) for t in range(len(time_order)) for e in range(N)
                 if not np.isnan(G[t, e]) and valid[t, e] and not learned[t, e]]
        expected = ready[:batch_size]

        batch = buffer.episodes(gamma)
        got = batch.slots[batch.mask].tolist()
        assert got == [time_order[t] * N + e for t, e in expected]
        want_returns = [G[t, e] for t, e in expected]
        np.testing.assert_allclose(batch.returns[batch.mask].numpy(), want_returns, rtol=1e-5, atol=1e-5)
        assert batch.obs[batch.mask].shape == (len(expected), 2) and batch.mask.shape == (buffer.batch_size,)
        for (t, e), obs, action, log_prob in zip(expected, batch.obs[batch.mask], batch.actions[batch.mask],
                                                 batch.log_probs[batch.mask]):
            assert torch.equal(obs, s.obs[time_order[t], e]) and action == s.actions[time_order[t], e]
            assert log_prob == -(obs[0] + 1)  # recorded as step k was acted from obs k - 1

        before = buffer.learned.clone()
        buffer.mark_learned(batch)
        changed = (buffer.learned != before).flatten().nonzero().flatten().tolist()
        assert sorted(changed) == sorted(got)  # exactly the batch's steps, each newly learned
        pending -= {(int(obs[0]) + 1, slot % N) for obs, slot in zip(batch.obs[batch.mask], got)}
        assert buffer.take_lost().item() == lost
        lost = 0


def test_policy_gradient_raises_probability_of_rewarded_action():
    torch.manual_seed(0)
    policy = PolicyNetwork((1,), 2, (8,))
    update = reinforce.make_update(policy, Adam(policy, lr=0.05), "none", False, 0.0, 0.0, torch.zeros(()))
    obs = torch.ones(4, 1)
    batch_fields = dict(obs=obs, actions=torch.tensor([0, 1, 0, 1]), returns=torch.tensor([1.0, -1.0, 1.0, -1.0]),
                        mask=torch.tensor([True, True, True, False]), log_probs=torch.zeros(4), slots=torch.arange(4))
    from fastrl.buffer import Episodes
    p0 = torch.softmax(policy(obs[:1]), 1)[0, 0].item()
    for _ in range(5):
        update(Episodes(**batch_fields))
    assert torch.softmax(policy(obs[:1]), 1)[0, 0].item() > p0 + 0.1


@pytest.mark.slow
def test_reinforce_cartpole_learns_to_greedy_195(tmp_path):
    config = fastrl.make_config(algo="reinforce", env_id="CartPole-v1", total_steps=60_000,
                                eval_episodes=20, progress=False, run_dir=str(tmp_path / "r"))
    summary = fastrl.train(config)
    assert summary["final_eval_episodes"] == 20 and summary["final_eval_mean"] >= 195, summary
    result = fastrl.evaluate(summary["checkpoint"], episodes=20, seed=5)
    assert result.mean >= 195, result


def _reinforce_after_updates(mode, device, updates=8):
    """Policy parameters and losses after `updates` steps (value baseline, normalised
    returns, entropy) on fixed random batches that differ from step to step."""
    from fastrl.buffer import Episodes
    torch.manual_seed(0)
    policy = PolicyNetwork((4,), 3, (32,), value_head=True).to(device)
    update = reinforce.make_update(policy, Adam(policy, lr=0.01, max_grad_norm=1.0), "value", True, 0.01, 0.5,
                                   torch.zeros((), device=device), mode)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(updates):
        batch = Episodes(obs=torch.randn(64, 4, generator=gen), actions=torch.randint(0, 3, (64,), generator=gen),
                         returns=torch.randn(64, generator=gen), mask=torch.rand(64, generator=gen) < 0.7,
                         log_probs=-torch.rand(64, generator=gen), slots=torch.arange(64))
        losses.append(update(Episodes(*(t.to(device) for t in batch))).loss.item())
    return [p.detach().cpu() for p in policy.parameters()], losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reinforce_cuda_graph_learner_gives_the_compiled_updates():
    # The batch is an argument: each call copies it into the graph's static inputs.
    cuda = torch.device("cuda")
    compiled, compiled_losses = _reinforce_after_updates("compile", cuda)
    graphed, graphed_losses = _reinforce_after_updates("cudagraphs", cuda)  # 3 warm-up, record, replays
    assert np.allclose(compiled_losses, graphed_losses, rtol=1e-4, atol=1e-6)
    for a, b in zip(compiled, graphed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
