"""fastrl: high-throughput small-scale deep RL in plain PyTorch.

    import fastrl
    summary = fastrl.train(fastrl.make_config(env_id="CartPole-v1"))
    result = fastrl.evaluate(summary["checkpoint"], episodes=100)
"""
from fastrl.config import PRESETS, TrainConfig, make_config
from fastrl.errors import (
                           BadEnvOutput,
                           ConfigError,
                           Diverged,
                           EnvCloseError,
                           EnvError,
                           EnvMakeError,
                           WorkerDied,
                           WriteFailed,
)
from fastrl.evaluate import EvalResult
from fastrl.evaluate import evaluate_checkpoint as evaluate
from fastrl.evaluate import load_policy as load
from fastrl.timing import startup_s
from fastrl.train import train

# Time to solve counts the start-up a fresh process pays: measured now, once imports are done.
startup_s()

__all__ = ["train", "evaluate", "load", "make_config", "TrainConfig", "EvalResult", "PRESETS",
           "ConfigError", "EnvError", "EnvMakeError", "EnvCloseError", "BadEnvOutput", "WorkerDied", "WriteFailed",
           "Diverged"]
__version__ = "0.1.0"
