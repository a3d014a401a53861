"""fastrl: high-throughput small-scale deep RL in plain PyTorch.

    import fastrl
    summary = fastrl.train(fastrl.make_config(env_id="CartPole-v1"))
    result = fastrl.evaluate(summary["checkpoint"], episodes=100)
"""
from fastrl.checkpoint import WriteFailed
from fastrl.config import PRESETS, ConfigError, TrainConfig, make_config
from fastrl.envs import EnvError, WorkerDied
from fastrl.evaluate import EvalResult
from fastrl.evaluate import evaluate_checkpoint as evaluate
from fastrl.evaluate import load_policy as load
from fastrl.run import Diverged
from fastrl.timing import startup_s
from fastrl.train import train

# Time to solve counts the start-up a fresh process pays: measured now, once imports are done.
startup_s()

__all__ = ["train", "evaluate", "load", "make_config", "TrainConfig", "ConfigError", "WorkerDied", "WriteFailed",
           "EnvError", "Diverged", "EvalResult", "PRESETS"]
__version__ = "0.1.0"
