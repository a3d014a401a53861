import math
import signal
import time
from types import SimpleNamespace

import pytest
import torch

import fastrl
from fastrl import checkpoint
from fastrl.config import SEED_LIMIT
from fastrl.envs import inspect_env
from fastrl.errors import WorkerDied
from fastrl.evaluation import EVAL_SEED_OFFSET, BackgroundEvaluator, Evaluator
from fastrl.nets import build_network, greedy_policy


def zeros(obs):
    return torch.zeros(len(obs), dtype=torch.long)


def test_evaluator_runs_exact_episode_counts_and_screens():
    ev = Evaluator("fastrl-test/Terminating-v0", {}, num_envs=3, seed=0, device=torch.device("cpu"))
    try:
        full = ev.run(zeros, episodes=7)
        assert full.episodes == 7 and full.returns == [6.0] * 7 and full.std == 0.0
        ones = ev.run(lambda o: torch.ones(len(o), dtype=torch.long), episodes=4)
        assert ones.mean == 6.0 + 1.5  # the action enters every reward
        screened = ev.run(zeros, episodes=30, screen_below=100.0)
        assert screened.episodes == 3  # one episode per env, then stop
        passed = ev.run(zeros, episodes=30, screen_below=1.0)
        assert passed.episodes == 30
    finally:
        ev.close()


def heuristic_policy(obs: torch.Tensor) -> torch.Tensor:
    """gymnasium's LunarLander heuristic, row by row: an action that depends on its own
    row alone, whatever the batch."""
    from gymnasium.envs.box2d.lunar_lander import heuristic
    discrete = SimpleNamespace(unwrapped=SimpleNamespace(continuous=False))
    return torch.tensor([heuristic(discrete, row) for row in obs.numpy()], dtype=torch.long)


def plain_episodes(seed: int, count: int) -> tuple[list[float], list[int]]:
    """`count` episodes of one LunarLander env seeded `seed`, one after another: (returns,
    the steps each took, the autoreset's step before it included)."""
    import gymnasium as gym
    env = gym.make("LunarLander-v3")
    obs, _ = env.reset(seed=seed)
    returns, steps = [], []
    for k in range(count):
        if k:
            obs, _ = env.reset()
        total, done, n = 0.0, False, int(k > 0)
        while not done:
            obs, reward, terminated, truncated, _ = env.step(int(heuristic_policy(torch.as_tensor(obs[None]))[0]))
            total, done, n = total + reward, terminated or truncated, n + 1
        returns.append(total)
        steps.append(n)
    env.close()
    return returns, steps


def test_an_evaluation_is_each_envs_own_episodes_and_steps_no_env_past_its_quota():
    """The batched evaluation against a plain loop over its envs, one at a time: env i
    plays its quota of episodes from seed + i, and the evaluation takes exactly their
    steps (an env done with its quota, or waiting for the screen, is not stepped)."""
    envs, episodes, seed = 4, 10, 7
    plain = [plain_episodes(seed + i, 3 if i < 2 else 2) for i in range(envs)]  # quotas 3, 3, 2, 2
    ev = Evaluator("LunarLander-v3", {}, num_envs=envs, seed=0, device=torch.device("cpu"))
    try:
        def run(screen_below: float) -> tuple[list[float], int]:
            """(returns, env steps taken) of an evaluation."""
            steps = []
            result = ev.run(heuristic_policy, episodes, screen_below, seed=seed,
                            on_episodes=lambda n, s: steps.append(s))
            return result.returns, steps[-1]

        every = ([r for returns, _ in plain for r in returns], sum(sum(s) for _, s in plain))
        assert run(math.nan) == every
        assert run(-1e9) == every  # a screen that passes
        assert run(1e9) == ([returns[0] for returns, _ in plain], sum(s[0] for _, s in plain))  # one that fails
    finally:
        ev.close()


def test_eval_seeds_are_disjoint_from_training_seeds():
    # Training envs use seed + i for i < num_envs; seeds, both kinds, are validated below SEED_LIMIT.
    assert EVAL_SEED_OFFSET > SEED_LIMIT + 10_000


def test_every_preset_counts_solved_over_100_episodes():
    # An env's reward_threshold is defined as a mean over 100 consecutive episodes, and
    # fewer let luck declare a policy solved: DDQN on CartPole, seed 3, evaluated 478.0
    # over 20 episodes after 20,000 steps, and the same policy 470.5 over 100.
    for algo, env_id in fastrl.PRESETS:
        config = fastrl.make_config(algo=algo, env_id=env_id)
        assert config.eval_episodes >= 100, (algo, env_id, config.eval_episodes)


def _cartpole_config(**overrides):
    return fastrl.make_config(env_id="CartPole-v1", hidden=(16,), eval_envs=3, seed=4, **overrides)


def test_background_evaluations_equal_in_process_ones_in_order():
    config = _cartpole_config()
    spec = inspect_env("CartPole-v1", {})
    nets = [build_network(config, spec.obs_shape, spec.n_actions) for _ in range(3)]  # three random policies
    here = Evaluator("CartPole-v1", {}, config.eval_envs, config.seed, torch.device("cpu"))
    there = BackgroundEvaluator(config, spec)
    try:
        counts, results = [], []
        plan = [(nets[0], 7, math.nan, None), (nets[1], 9, 1e9, None), (nets[2], 5, math.nan, 77),
                (nets[0], 7, math.nan, 77)]
        for net, episodes, screen, seed in plan:
            there.submit(net.state_dict(), episodes, screen, seed)
            expected = here.run(greedy_policy(net), episodes, screen, seed=seed)  # meanwhile, in this process
            got = there.result()
            assert got == expected and not there.in_flight
            counts.append(got.episodes)
            results.append(got)
        assert counts == [7, 3, 5, 7]  # the second was screened after one round of 3 envs
        assert results[3].returns != results[0].returns  # the same policy, reseeded: other episodes
    finally:
        here.close()
        there.close()


def test_a_dead_evaluation_process_is_a_clear_error():
    evaluator = BackgroundEvaluator(_cartpole_config(), inspect_env("CartPole-v1", {}))
    evaluator._process.kill()
    evaluator._process.join()
    with pytest.raises(WorkerDied, match=rf"evaluation process \(pid {evaluator._process.pid}\) ended "
                                         rf"unexpectedly \(killed by signal {int(signal.SIGKILL)}\)"):
        net = build_network(_cartpole_config(), (4,), 2)
        evaluator.submit(net.state_dict(), 3)
        evaluator.result()
    evaluator.close()


@pytest.mark.slow
def test_training_goes_on_during_evaluation_and_keeps_the_policy_that_solved(tmp_path, monkeypatch):
    # Evaluation takes 0.5 s here (the process is forked with this patch), so training runs
    # on past the evaluated weights; once they solve, the run must report, save and keep them.
    real_run = Evaluator.run

    def slow_run(self, *args, **kwargs):
        time.sleep(0.5)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "run", slow_run)
    common = dict(learning_starts=200, learner="eager", backend="sync", num_envs=2, eval_episodes=3,
                  progress=False)
    solving = _cartpole_config(**common, eval_interval=1_000, solve_threshold=0.0, total_steps=100_000,
                               run_dir=str(tmp_path / "solve"))
    s = fastrl.train(solving)
    assert s["solved"] and s["solve_env_steps"] == 1_000
    assert s["env_steps"] > s["solve_env_steps"]  # trained on while the evaluation ran
    assert s["final_eval_episodes"] == 3  # the solving evaluation is the final one: no other ran
    # The same seed trained for exactly those steps gives the weights that were saved.
    reference = _cartpole_config(**common, eval_interval=0, stop_on_solve=False, total_steps=1_000,
                                 run_dir=str(tmp_path / "ref"))
    r = fastrl.train(reference)
    saved, expected = checkpoint.load(s["checkpoint"]), checkpoint.load(r["checkpoint"])
    assert saved["meta"]["env_steps"] == 1_000
    assert all(torch.equal(saved["model"][k], expected["model"][k]) for k in expected["model"])
    assert s["final_eval_mean"] == r["final_eval_mean"]  # the same weights, the same eval seeds
