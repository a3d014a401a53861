"""The learners' maths against hand computations and plain loops: a Double-DQN step with
s != s', non-zero discounts and mixed weights; every REINFORCE baseline and entropy
setting with a mask; the dueling head; the lr and epsilon schedules as the loop applies
them. Each test names the wrong maths it catches."""
import copy
import math

import numpy as np
import pytest
import torch
from by_hand import Table
from torch import nn

import fastrl
from fastrl.algos import ddqn, reinforce
from fastrl.buffer import Episodes, Transitions
from fastrl.nets import PolicyNetwork, QNetwork
from fastrl.optim import Adam
from fastrl.schedules import learning_rate, linear_schedule

ONLINE = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]   # 3 actions, 2-d observations
TARGET = [[10.0, 0.0], [0.0, -10.0], [1.0, 1.0]]


def hand_batch() -> Transitions:
    """Three transitions whose Double-DQN targets, worked out by hand:
    s'0 = [2, 1]: online Q = [2, 1, 1.5] -> a* = 0; target Q(s', 0) = 20;  y0 = 1 + 0.9 * 20 = 19
    s'1 = [0, 3]: online Q = [0, 3, 1.5] -> a* = 1; target Q(s', 1) = -30; y1 = -1 + 0.81 * -30 = -25.3
    s'2 = [1, 2]: online Q = [1, 2, 1.5] -> a* = 1; target Q(s', 1) = -20; y2 = 0.5 + 0.5 * -20 = -9.5
    (the target network's own argmax at s'2 is action 0: swapping the networks gives 1.5;
    bootstrapping from s instead of s' gives y0 = 1 + 0.9 * 10 = 10)."""
    return Transitions(obs=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
                       actions=torch.tensor([0, 1, 2]),
                       returns=torch.tensor([1.0, -1.0, 0.5]),
                       next_obs=torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 2.0]]),
                       discount=torch.tensor([0.9, 0.81, 0.5]),
                       weight=torch.tensor([1.0, 0.0, 1.0]))


def test_double_dqn_targets_bootstrap_from_the_next_state_with_online_argmax_and_target_value():
    y = ddqn.double_dqn_targets(Table(ONLINE), Table(TARGET), hand_batch())
    assert torch.allclose(y, torch.tensor([19.0, -25.3, -9.5]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_a_ddqn_learn_step_matches_the_hand_computed_loss_update_and_target_update(mode):
    """Catches: targets from s instead of s', online and target swapped in the argmax, the
    loss divided by the batch size instead of the sum of the weights, a target update
    before the gradient step or at the wrong rate."""
    q, q_target = Table(ONLINE), Table(TARGET).requires_grad_(False)
    batch = hand_batch()
    learn = ddqn.make_learn_step(lambda: batch, q, q_target, Adam(q, lr=0.1, max_grad_norm=10.0), tau=0.5,
                                 target_update_interval=1, learner=mode)
    stats = learn()
    # Q(s, a) = 1 for all three samples; Huber(1 - y): 17.5, 25.8 (weight 0), 10.
    assert stats.loss.item() == pytest.approx((17.5 + 10.0) / 2)
    assert stats.q_mean.item() == pytest.approx(1.0)
    # Gradients (weight sum 2): W[0] gets -s0 / 2, W[2] gets +s2 / 2, W[1] none (weight 0).
    assert stats.grad_norm.item() == pytest.approx(math.sqrt(3 * 0.25))
    # Adam's first step moves each weight with a gradient by lr against its sign.
    expected = torch.tensor([[1.1, 0.0], [0.0, 1.0], [0.4, 0.4]])
    assert torch.allclose(q.w.detach(), expected, atol=1e-6)
    assert torch.allclose(q_target.w, 0.5 * torch.tensor(TARGET) + 0.5 * expected, atol=1e-6)


def test_td_loss_weighs_each_sample_and_normalises_by_the_weights():
    q, batch = Table(ONLINE), hand_batch()
    y = torch.tensor([2.0, 3.0, 1.5])  # |Q(s, a) - y| <= 2: Huber is quadratic below 1, linear above
    loss, q_sa = ddqn.td_loss(q, batch, y)
    per_sample = [abs(1 - 2.0) - 0.5, abs(1 - 3.0) - 0.5, 0.5 * (1 - 1.5) ** 2]
    assert loss.item() == pytest.approx((per_sample[0] + per_sample[2]) / 2)
    assert q_sa.tolist() == pytest.approx([1.0, 1.0, 1.0])  # Q(s, a) of each sample


def test_the_dueling_head_splits_q_into_a_state_value_and_zero_mean_advantages():
    """Catches a dueling head without the mean subtraction (or with max in its place)."""
    torch.manual_seed(0)
    net = QNetwork((3,), 4, hidden=(8,), dueling=True)
    obs = torch.randn(16, 3)
    q = net(obs)
    h = net.torso(obs)
    value, advantage = net.value(h), net.advantage(h)
    assert torch.allclose(q.mean(dim=1, keepdim=True), value, atol=1e-6)  # the mean over actions is V(s)
    assert torch.allclose(q - q[:, :1], advantage - advantage[:, :1], atol=1e-6)  # differences are A's
    plain = QNetwork((3,), 4, hidden=(8,), dueling=False)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("value")})
    assert torch.allclose(plain(obs), advantage)


# --- REINFORCE ----------------------------------------------------------------------------

def naive_reinforce_loss(policy, batch, baseline, normalize, entropy_coef, value_coef, running_mean,
                         importance_clip=0.0):
    """The REINFORCE loss over the masked steps, one step at a time."""
    logits, values = policy(batch.obs, with_value=True)
    logits, values = logits.detach().double(), values.detach().double()
    steps = [i for i in range(len(batch.mask)) if batch.mask[i]]
    count = max(len(steps), 1)
    returns = [float(batch.returns[i]) for i in range(len(batch.mask))]
    if normalize:
        mean = sum(returns[i] for i in steps) / count
        std = math.sqrt(sum((returns[i] - mean) ** 2 for i in steps) / count)
        returns = [(r - mean) / (std + 1e-8) for r in returns]
    policy_loss = entropy = value_loss = 0.0
    for i in steps:
        log_probs = torch.log_softmax(logits[i], dim=0)
        base = {"value": float(values[i]), "mean": running_mean, "none": 0.0}[baseline]
        weight = 1.0
        if importance_clip > 0:
            weight = min(math.exp(float(log_probs[batch.actions[i]]) - float(batch.log_probs[i])), importance_clip)
        policy_loss -= weight * float(log_probs[batch.actions[i]]) * (returns[i] - base)
        entropy -= float((log_probs.exp() * log_probs).sum())
        if baseline == "value":
            value_loss += (float(values[i]) - returns[i]) ** 2
    policy_loss, entropy, value_loss = policy_loss / count, entropy / count, value_loss / count
    loss = policy_loss - entropy_coef * entropy + value_coef * value_loss
    batch_mean = sum(returns[i] for i in steps) / count
    return loss, policy_loss, value_loss, entropy, batch_mean


def random_episodes(seed: int) -> Episodes:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(12, generator=gen) < 0.6
    mask[0], mask[1] = True, False  # both kinds, whatever the draw
    return Episodes(obs=torch.randn(12, 4, generator=gen), actions=torch.randint(0, 3, (12,), generator=gen),
                    returns=3 * torch.randn(12, generator=gen) + 1, mask=mask,
                    log_probs=-2 * torch.rand(12, generator=gen), slots=torch.arange(12))


@pytest.mark.parametrize("baseline", ["none", "mean", "value"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
@pytest.mark.parametrize("importance_clip", [0.0, 0.8])
def test_reinforce_loss_matches_the_per_step_loop(baseline, normalize, entropy_coef, importance_clip):
    """Catches: a loss over unmasked steps, a flipped entropy sign, a baseline left out or
    the running mean moved before its use, normalisation over unmasked steps, importance
    weights inverted or not truncated (the batch's ratios lie on both sides of 0.8)."""
    torch.manual_seed(0)
    policy = PolicyNetwork((4,), 3, (16,), value_head=baseline == "value")
    running_mean = torch.tensor(0.7)
    value_coef = 0.5
    grads_fn = reinforce.make_gradients(policy, dict(policy.named_parameters()), baseline, normalize,
                                        entropy_coef, value_coef, running_mean, importance_clip)
    for seed in (1, 2):  # the mean baseline carries over from one batch to the next
        batch = random_episodes(seed)
        before = float(running_mean)
        loss, policy_loss, value_loss, entropy, batch_mean = naive_reinforce_loss(
            policy, batch, baseline, normalize, entropy_coef, value_coef, before, importance_clip)
        _, got_loss, (got_policy, got_value, got_entropy) = grads_fn(batch)
        assert got_loss.item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert got_policy.item() == pytest.approx(policy_loss, rel=1e-5, abs=1e-6)
        assert got_value.item() == pytest.approx(value_loss, rel=1e-5, abs=1e-6)
        assert got_entropy.item() == pytest.approx(entropy, rel=1e-5, abs=1e-6)
        # The running mean moves 10% towards the batch's mean return, after its use.
        expected_mean = before + 0.1 * (batch_mean - before) if baseline == "mean" else 0.7
        assert running_mean.item() == pytest.approx(expected_mean, rel=1e-5, abs=1e-6)


def test_the_value_baseline_gets_no_gradient_from_the_policy_loss():
    """Catches an advantage whose baseline is not detached: the policy loss would train
    the value head. With value_coef = 0 the value head's gradient is exactly zero, and
    the value loss alone trains it otherwise."""
    torch.manual_seed(0)
    policy = PolicyNetwork((4,), 3, (16,), value_head=True)
    params = dict(policy.named_parameters())
    batch = random_episodes(3)
    for value_coef in (0.0, 0.5):
        grads, _, _ = reinforce.make_gradients(policy, params, "value", True, 0.01, value_coef,
                                               torch.zeros(()))(batch)
        value_grad = torch.cat([grads["value.weight"].flatten(), grads["value.bias"]])
        assert (value_grad.abs().sum() == 0) == (value_coef == 0.0)


def test_importance_weights_scale_each_steps_gradient_and_carry_none_themselves():
    """The gradient is sum_i w_i * grad log pi(a_i|s_i) * G_i / count, w_i = min(pi/mu, clip)
    held constant: catches a weight the gradient flows through (grad of pi/mu * G)."""
    torch.manual_seed(0)
    policy = PolicyNetwork((4,), 3, (16,))
    params = dict(policy.named_parameters())
    batch = random_episodes(5)
    grads, _, _ = reinforce.make_gradients(policy, params, "none", False, 0.0, 0.0, torch.zeros(()), 0.8)(batch)
    log_probs = torch.log_softmax(policy(batch.obs), dim=1)
    steps = [i for i in range(len(batch.mask)) if batch.mask[i]]
    loss = 0.0
    for i in steps:
        log_prob = log_probs[i, batch.actions[i]]
        weight = min(math.exp(log_prob.item() - batch.log_probs[i].item()), 0.8)
        loss = loss - weight * log_prob * batch.returns[i].item()
    expected = torch.autograd.grad(loss / len(steps), list(params.values()))
    for name, want in zip(params, expected):
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6)


def test_acting_returns_the_log_probability_of_the_sampled_action():
    torch.manual_seed(0)
    policy = PolicyNetwork((4,), 3, (16,))
    obs = torch.randn(500, 4)
    actions, log_probs = reinforce.make_act(policy)(obs)
    expected = torch.log_softmax(policy(obs), dim=1).gather(1, actions.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(log_probs, expected.detach())
    assert len(set(actions.tolist())) == 3  # sampled, not the argmax of one state's logits


def test_reinforce_update_descends_the_loss_of_its_batch():
    torch.manual_seed(0)
    policy = PolicyNetwork((4,), 3, (16,), value_head=True)
    update = reinforce.make_update(policy, Adam(policy, lr=1e-2), "value", True, 0.01, 0.5, torch.zeros(()))
    batch = random_episodes(4)
    losses = [update(batch).loss.item() for _ in range(30)]
    assert losses[-1] < losses[0] - 0.1


# --- schedules as the loop applies them ----------------------------------------------------

def test_learning_rate_anneals_linearly_to_lr_end_at_total_steps():
    config = fastrl.make_config(env_id="CartPole-v1", lr=1e-3, lr_end=1e-4, total_steps=1000)
    assert learning_rate(config, 0) == pytest.approx(1e-3)
    assert learning_rate(config, 500) == pytest.approx(5.5e-4)
    assert learning_rate(config, 1000) == pytest.approx(1e-4) == learning_rate(config, 5000)
    constant = fastrl.make_config(env_id="CartPole-v1", lr=1e-3, lr_end=float("nan"), total_steps=1000)
    assert learning_rate(constant, 0) == learning_rate(constant, 900) == 1e-3


def test_the_training_loop_acts_with_the_scheduled_epsilon_and_learns_with_the_scheduled_lr(tmp_path, monkeypatch):
    """The device tensors that acting and the optimizer read follow the host schedules:
    catches a loop that stops filling either in place."""
    seen = []  # (env steps when acting, eps the act function got, lr the optimizer held)
    real_make_act, real_adam_init = ddqn.make_act, Adam.__init__
    optimizers = []

    def adam_init(self, *args, **kwargs):
        real_adam_init(self, *args, **kwargs)
        optimizers.append(self)

    def make_act(q):
        act = real_make_act(q)

        def recording_act(obs, eps):
            seen.append((float(eps), float(optimizers[0].lr)))
            return act(obs, eps)

        return recording_act

    monkeypatch.setattr(ddqn, "make_act", make_act)
    monkeypatch.setattr(Adam, "__init__", adam_init)
    config = fastrl.make_config(env_id="CartPole-v1", backend="sync", num_envs=4, total_steps=400,
                                learning_starts=100, eps_start=1.0, eps_end=0.1, eps_decay_steps=200,
                                lr=1e-3, lr_end=1e-4, learner="eager", eval_interval=0, eval_episodes=2,
                                eval_envs=2, progress=False, run_dir=str(tmp_path / "run"))
    fastrl.train(config)
    assert len(seen) == 100  # one act per vector step of 4 envs
    for step, (eps, lr) in enumerate(seen):
        env_steps = 4 * step  # acting for step k uses the schedules after the k steps before it
        assert eps == pytest.approx(linear_schedule(env_steps, 1.0, 0.1, 200), abs=1e-6)
        assert lr == pytest.approx(learning_rate(config, env_steps), rel=1e-5)


# --- end to end: DDQN learns the known Q-values of a tiny env ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n_step", [1, 3])
def test_ddqn_learns_the_known_q_values_with_terminations_and_truncations(tmp_path, n_step):
    """fastrl-test/RandomEnd-v0: action 0 pays 0.1, action 1 pays 0.05, and each step
    terminates with probability 0.1; a time limit truncates the episodes that last 5 steps
    (most of them). With gamma 0.9 the true values are Q(0) = 0.1 / (1 - 0.81) = 0.526 and
    Q(1) = 0.05 + 0.81 Q(0) = 0.476. Bootstrapping after terminations gives Q(0) = 1;
    treating truncations as terminations gives about 0.37."""
    config = fastrl.make_config(env_id="fastrl-test/RandomEnd-v0", backend="sync", num_envs=4, gamma=0.9,
                                n_step=n_step, hidden=(16,), lr=1e-3, lr_end=1e-4, batch_size=128, buffer_size=4000,
                                learning_starts=200, replay_ratio=0.5, tau=0.05, eps_start=1.0, eps_end=0.2,
                                eps_decay_steps=1000, total_steps=6000, learner="eager", eval_interval=0,
                                eval_episodes=2, eval_envs=2, progress=False, seed=0,
                                solve_threshold=float("nan"), run_dir=str(tmp_path / "run"))
    summary = fastrl.train(config)
    _, model, _ = fastrl.load(summary["checkpoint"])
    with torch.no_grad():
        q0, q1 = model(torch.ones(1, 1))[0].tolist()
    assert q0 == pytest.approx(0.1 / (1 - 0.81), abs=0.04), (q0, q1)
    assert q1 == pytest.approx(0.05 + 0.081 / (1 - 0.81), abs=0.04), (q0, q1)


def test_the_batched_ddqn_loss_matches_a_per_sample_loop():
    """The batched step against a plain per-sample loop on random data (eager autograd)."""
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    q_target = copy.deepcopy(q).requires_grad_(False)
    for p in q_target.parameters():
        p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(2)
    batch = Transitions(obs=torch.randn(10, 3, generator=gen), actions=torch.randint(0, 4, (10,), generator=gen),
                        returns=torch.randn(10, generator=gen), next_obs=torch.randn(10, 3, generator=gen),
                        discount=torch.rand(10, generator=gen), weight=(torch.rand(10, generator=gen) < 0.7).float())
    y = ddqn.double_dqn_targets(q, q_target, batch)
    loss, _ = ddqn.td_loss(q, batch, y)
    naive, weights = 0.0, 0.0
    with torch.no_grad():
        for i in range(10):
            a_star = int(np.argmax(q(batch.next_obs[i]).numpy()))
            target = float(batch.returns[i]) + float(batch.discount[i]) * float(q_target(batch.next_obs[i])[a_star])
            delta = abs(float(q(batch.obs[i])[batch.actions[i]]) - target)
            huber = 0.5 * delta ** 2 if delta < 1 else delta - 0.5
            naive += float(batch.weight[i]) * huber
            weights += float(batch.weight[i])
    assert loss.item() == pytest.approx(naive / max(weights, 1.0), rel=1e-5)
