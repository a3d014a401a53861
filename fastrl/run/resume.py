"""What a resumed run (`fastrl train --resume RUN_DIR`) starts from: the state.pt its run
saved last, and the settings it may change.

The episodes that were running when the run stopped are not resumed (the envs' own
state is not saved): the envs are reset on new seeds, and the replay ring ends each of
those episodes at its last saved step as a truncation (see ReplayRing.cut), so no n-step
window spans the cut. REINFORCE drops them instead: their returns are unknown.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from fastrl import checkpoint
from fastrl.config import TrainConfig, validate
from fastrl.errors import ConfigError

# What a resumed run may set anew: budgets, checkpointing and logging. Everything else
# would make it another experiment than the one its curves and state belong to.
MAY_CHANGE = ("total_steps", "time_limit_s", "checkpoint_interval", "log_interval", "progress", "timers",
              "pin_workers", "run_dir", "video", "ray_address")


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def saved_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The config of the run in `run_dir` (its config.json); a ConfigError if there is none."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: no such run directory")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it holds no run (no config.json)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its config.json is unreadable ({exc})") from None


def resumed(run_dir: str | os.PathLike, config: TrainConfig | None) -> tuple[TrainConfig, dict]:
    """(the config, the saved state) a resumed run goes on with. `config`, if given, may
    differ from the saved run's only in MAY_CHANGE; else the saved config is used. Every
    refusal is a one-line ConfigError."""
    saved = saved_config(run_dir)
    state_path = Path(run_dir) / "state.pt"
    if not state_path.exists():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it holds no state.pt (the run saved none: it stopped "
                          f"before its first checkpoint, or was a profile)")
    try:
        state = checkpoint.load_payload(state_path, checkpoint.STATE_FORMAT, "state")
    except ValueError as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("loop"), dict):
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its state.pt lacks the config or the loop's state")
    at_save = TrainConfig.from_dict(state["config"])
    config = config or saved
    config = dataclasses.replace(config, run_dir=str(run_dir))
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if not _same(getattr(config, f.name), getattr(at_save, f.name)) and f.name not in MAY_CHANGE]
    if changed:
        name = changed[0]
        raise ConfigError(f"cannot resume with {name}={getattr(config, name)!r}: the run in {str(run_dir)!r} was "
                          f"trained with {name}={getattr(at_save, name)!r}; a resumed run may change only "
                          f"{', '.join(MAY_CHANGE)}")
    validate(config)
    # A run that ended but was killed before its summary was written (its state says it
    # is done) resumes to write it; one that has its summary is done.
    if not _ended(Path(run_dir)):
        return config, state
    evals = state["evals"]
    if evals["solved"] and config.stop_on_solve:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it solved the env at {evals['solve_env_steps']:,} env "
                          f"steps and stopped there, as stop_on_solve asks")
    if state["env_steps"] >= config.total_steps:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it has used its budget (total_steps="
                          f"{config.total_steps:,}, {state['env_steps']:,} env steps done); pass a larger "
                          f"--total-steps to go on")
    if 0 < config.time_limit_s <= state["wall_s"]:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it has used its time budget (time_limit_s="
                          f"{config.time_limit_s:g}, {state['wall_s']:.0f} s trained); pass a larger --time-limit-s, "
                          f"or 0 for none, to go on")
    return config, state


def _ended(run_dir: Path) -> bool:
    """True if the run's summary.json says it ended (not stopped, not failed)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return not summary["interrupted"] and summary["error"] is None
    except (OSError, ValueError, KeyError, TypeError):
        return False
