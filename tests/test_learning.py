"""Learning outcomes and reproducibility (the slowest tests in the suite)."""
import json

import pytest
import torch

import fastrl
from fastrl import checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("collection", [{}, {"collection": "ready-first", "num_workers": 2}],
                         ids=["lockstep", "ready-first"])
def test_ddqn_cartpole_learns_to_greedy_195(tmp_path, collection, capsys):
    # Ready-first collection steps each worker's envs in the order they get ready, so no two
    # runs learn alike: the run stops once an evaluation of 20 episodes solves (>= 195),
    # with a budget well beyond what lockstep needs, rather than at a fixed step count.
    config = fastrl.make_config(env_id="CartPole-v1", total_steps=80_000, **collection, solve_threshold=195,
                                eval_interval=5_000, eval_episodes=20, progress=False, run_dir=str(tmp_path / "cp"))
    summary = fastrl.train(config)
    # The default learner, auto, ran (and recorded) compile here, CUDA graphs on CUDA.
    ran = json.loads((tmp_path / "cp" / "config.json").read_text())
    assert ran["learner"] == ("cudagraphs" if torch.cuda.is_available() else "compile")
    assert ran["collection"] == collection.get("collection", "lockstep")
    # The first line explains up front why the first log window's rate stalls.
    assert "(the first update compiles it: " in capsys.readouterr().out.splitlines()[0]
    assert summary["final_eval_episodes"] == 20
    assert summary["final_eval_mean"] >= 195, summary
    # The saved policy reproduces that skill on fresh, disjoint eval seeds.
    result = fastrl.evaluate(summary["checkpoint"], episodes=20, seed=123)
    assert result.mean >= 195, result


def test_same_seed_same_learning_curve(tmp_path):
    def run(name, seed):
        config = fastrl.make_config(env_id="CartPole-v1", total_steps=3_000, learning_starts=500,
                                    learner="eager", eval_interval=0, eval_episodes=2, eval_envs=2,
                                    progress=False, seed=seed, run_dir=str(tmp_path / name))
        summary = fastrl.train(config)
        return summary, checkpoint.load(summary["checkpoint"])["model"]

    (s1, w1), (s2, w2), (_, w3) = run("a", 1), run("b", 1), run("c", 2)
    assert s1["updates"] == s2["updates"] > 0
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert s1["final_eval_mean"] == s2["final_eval_mean"]
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)
