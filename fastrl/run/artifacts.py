"""The run directory and what a run leaves in it: config.json (written once the run has
started), checkpoint.pt (the weights of each evaluation, with its result), state.pt
(everything `--resume` continues from, every checkpoint_interval and when the run stops)
and summary.json. Every file is written atomically, with a checksum for the checkpoints:
an interrupted or failed write leaves the last good one."""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from fastrl import checkpoint
from fastrl.config import TrainConfig
from fastrl.envs import EnvSpec
from fastrl.errors import ConfigError, EnvError
from fastrl.evaluation import EvalResult


def default_run_dir(config: TrainConfig) -> str:
    """runs/<env>__<algo>__<seed>__<time>, one level deep: the env id without the module
    that registers it ("my_envs:") and with its namespace joined on ("ALE/Pong-v5" -> ALE-Pong-v5)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = config.env_id.rpartition(":")[2].replace("/", "-")
    return str(Path("runs") / f"{env}__{config.algo}__{config.seed}__{stamp}")


def create_run_dir(config: TrainConfig) -> Path:
    """Creates the run directory; an unusable path, or one that holds a run already (whose
    checkpoint and curves a new run would overwrite or mix with: its config.json, written
    once the run has started), is a ConfigError. Called before any worker process starts:
    a bad path leaves nothing running."""
    path = Path(config.run_dir or default_run_dir(config))
    if (path / "config.json").exists():
        raise ConfigError(f"invalid run_dir={str(path)!r}: it holds a run already (config.json); "
                          f"pass a new --run-dir")
    return checkpoint.make_dir(path, "run_dir")


def describe_failure(exc: Exception) -> str:
    """What summary.json keeps of the error that ended a run (call it where it is handled):
    for an env's error, the env's own traceback, from the process that ran it."""
    return exc.trace if isinstance(exc, EnvError) and exc.trace else traceback.format_exc(limit=3)


class RunDir:
    """The files of one run in `path` (made by create_run_dir)."""

    def __init__(self, path: Path, config: TrainConfig, spec: EnvSpec, chosen: dict | None = None):
        """`chosen`: what the run's automatic settings became here, and why (config.choices)."""
        self.path, self.config, self.spec, self.chosen = path, config, spec, chosen
        self.checkpoint = path / "checkpoint.pt"
        self.state = path / "state.pt"
        self._checkpoint_meta: dict | None = None

    def write_config(self) -> None:
        checkpoint.save_json(self.path / "config.json", {**self.config.to_dict(), "chosen": self.chosen})

    def save_checkpoint(self, weights: dict[str, torch.Tensor], env_steps: int, updates: int,
                        evaluation: EvalResult | None) -> str:
        """The weights (a state dict), with the env steps and updates after which the model
        held them, and their evaluation (None: not evaluated)."""
        result = (None if evaluation is None else
                  {"mean": evaluation.mean, "std": evaluation.std, "episodes": evaluation.episodes})
        checkpoint.save(self.checkpoint, self.config.to_dict(), weights,
                        meta={"env_steps": env_steps, "updates": updates, "evaluation": result,
                              "obs_shape": list(self.spec.obs_shape), "n_actions": self.spec.n_actions})
        self._checkpoint_meta = {"env_steps": env_steps, "updates": updates, "evaluation": result}
        return str(self.checkpoint)

    def saved_checkpoint(self) -> str | None:
        """The checkpoint saved last, if any (its meta says when)."""
        return str(self.checkpoint) if self.checkpoint.exists() else None

    def checkpoint_meta(self) -> dict:
        """The meta of checkpoint.pt (saved by this run, or by the run it resumes)."""
        if self._checkpoint_meta is None:
            self._checkpoint_meta = checkpoint.load(self.checkpoint)["meta"]
        return self._checkpoint_meta

    def save_state(self, state: dict) -> int:
        """Writes state.pt (see Run.save_state); returns its size in bytes."""
        return checkpoint.save_payload(self.state, state)

    def saved_state(self) -> str | None:
        return str(self.state) if self.state.exists() else None

    def write_summary(self, summary: dict) -> None:
        checkpoint.save_json(self.path / "summary.json", summary)

    def where(self) -> str:
        """Where the run is, for the user: its dir and the TensorBoard command."""
        return f"run dir: {self.path}  (tensorboard --logdir {self.path.parent})"
