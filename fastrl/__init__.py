"""fastrl: high-throughput small-scale deep RL in plain PyTorch.

    import fastrl
    summary = fastrl.train(fastrl.make_config(env_id="CartPole-v1"))
    result = fastrl.evaluate(summary["checkpoint"], episodes=100)

The names that need torch and gymnasium (train, evaluate, load, EvalResult) are imported
on first use, so that `fastrl` on the command line can answer Ctrl-C during those
imports, and `fastrl --help` is quick.
"""
import importlib

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

_LAZY = {"train": ("fastrl.training", "train"), "evaluate": ("fastrl.evaluation", "evaluate_checkpoint"),
         "load": ("fastrl.evaluation", "load_policy"), "EvalResult": ("fastrl.evaluation", "EvalResult")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastrl' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = ["train", "evaluate", "load", "make_config", "TrainConfig", "EvalResult", "PRESETS",
           "ConfigError", "EnvError", "EnvMakeError", "EnvCloseError", "BadEnvOutput", "WorkerDied", "WriteFailed",
           "Diverged"]
__version__ = "0.1.0"
