import torch

from fastrl.evaluate import EVAL_SEED_OFFSET, Evaluator


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


def test_eval_seeds_are_disjoint_from_training_seeds():
    # Training envs use seed + i for i < num_envs; seeds are validated below 2**31.
    assert EVAL_SEED_OFFSET > 2**31 + 10_000
