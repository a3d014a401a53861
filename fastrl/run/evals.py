"""The evaluation schedule of a training run: greedy evaluations in a background process
every `eval_interval` env steps, a cheap screen before each full one, stop-on-solve with
the time to solve, and the roll-back to the weights that solved."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from fastrl.config import TrainConfig
from fastrl.evaluation import BackgroundEvaluator, EvalResult, evaluation_seed
from fastrl.run.logs import TrainingLog


class Evaluations:
    """Evaluations run in their own process on a copy of the weights while training goes
    on. Every due evaluation runs, in order (a new one waits for the one in flight), so
    the results are those an evaluation in the trainer would give.

    With stop-on-solve, a first round of one episode per eval env screens out clearly
    unsolved policies; only a full `eval_episodes` mean can count as solved. Once one
    solves with stop-on-solve, the model rolls back to the weights it evaluated."""

    def __init__(self, config: TrainConfig, threshold: float, evaluator: BackgroundEvaluator, log: TrainingLog,
                 give_up: Callable[[], bool], solve_clock0: float,
                 on_result: Callable[[dict, int, int, EvalResult], None]):
        """`give_up()`: True when a wait for an evaluation should end (a stop request);
        `solve_clock0`: the `time.perf_counter()` from which time to solve counts;
        `on_result(weights, env_steps, updates, result)`: called with each result and the
        weights it measured (the run saves them as its checkpoint)."""
        self.config, self.threshold = config, threshold
        self._evaluator, self._log, self._give_up = evaluator, log, give_up
        self._solve_clock0 = solve_clock0
        self._on_result = on_result
        self._next = config.eval_interval if config.eval_interval > 0 else math.inf
        self._count = 0  # evaluations submitted: each one's env seeds follow from its number
        # In flight: ((env steps, updates), weights, the model, screened)
        self._evaluating: tuple[tuple[int, int], dict, torch.nn.Module, bool] | None = None
        self.last: EvalResult | None = None
        self.best_mean: float | None = None  # over full-size evaluations
        self.last_full_at: int | None = None  # the env steps of the weights it evaluated
        self.rolled_back_to: tuple[int, int] | None = None  # the model's (env steps, updates), once rolled back
        self.solved = False
        self.solve_wall_s: float | None = None
        self.solve_env_steps: int | None = None

    @property
    def in_flight(self) -> bool:
        return self._evaluating is not None

    @property
    def stopping(self) -> bool:
        """Solved, with stop-on-solve: training should stop."""
        return self.solved and self.config.stop_on_solve

    def due(self, env_steps: int) -> bool:
        """An evaluation is due, or the one in flight has finished."""
        return env_steps >= self._next or self._evaluator.ready()

    def collect_finished(self) -> None:
        if self._evaluator.ready():
            self.collect()

    def start_due(self, env_steps: int) -> bool:
        """True when an evaluation is due now (the schedule moves on): the one in flight,
        if any, is collected first, and none is due once training is to stop."""
        if env_steps < self._next or self.stopping:
            return False
        self._next = env_steps + self.config.eval_interval
        if self.in_flight:
            self.collect()
        return not self.stopping

    def submit(self, model: torch.nn.Module, env_steps: int, updates: int, screen: bool) -> None:
        """Starts evaluating a copy of `model`'s weights (trained for `env_steps`, `updates`)."""
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._submit(weights, env_steps, updates, model, screen)

    def _submit(self, weights: dict, env_steps: int, updates: int, model: torch.nn.Module, screen: bool) -> None:
        screen_below = self.threshold if screen and not math.isnan(self.threshold) else math.nan
        seed = evaluation_seed(self.config.seed, self._count)
        self._evaluator.submit(weights, self.config.eval_episodes, screen_below, seed)
        self._count += 1
        self._evaluating = ((env_steps, updates), weights, model, screen)

    def collect(self) -> None:
        """Waits for the evaluation in flight; logs it, hands it to `on_result` and checks
        it for a solve."""
        ((steps, updates), weights, model, _), self._evaluating = self._evaluating, None
        result = self._evaluator.result(give_up=self._give_up)
        self.last = result
        self._on_result(weights, steps, updates, result)
        full = result.episodes == self.config.eval_episodes
        if full:
            self.last_full_at = steps
            self.best_mean = max(result.mean, self.best_mean or -math.inf)
        self._log.evaluation(result, steps, screened=not full)
        if full and not self.solved and not math.isnan(self.threshold) and result.mean >= self.threshold:
            self.solved = True
            self.solve_wall_s = time.perf_counter() - self._solve_clock0
            self.solve_env_steps = steps
            self._log.message(f"solved: {result.mean:.1f} >= {self.threshold:g} after "
                              f"{steps:,} env steps, {self.solve_wall_s:.1f} s")
            if self.config.stop_on_solve:
                model.load_state_dict(weights)  # the policy that solved, not the one trained since
                self.rolled_back_to = (steps, updates)

    def state_dict(self) -> dict:
        """The schedule, the results so far and the evaluation in flight (its weights: a
        resumed run evaluates them first), for a resumed run."""
        evaluating = None
        if self._evaluating is not None:
            (steps, updates), weights, _, screen = self._evaluating
            evaluating = {"env_steps": steps, "updates": updates, "screen": screen,
                          "weights": {k: v.cpu() for k, v in weights.items()}}
        return {"next": self._next, "count": self._count, "evaluating": evaluating,
                "last": self.last._asdict() if self.last else None, "best_mean": self.best_mean,
                "last_full_at": self.last_full_at, "rolled_back_to": self.rolled_back_to, "solved": self.solved,
                "solve_wall_s": self.solve_wall_s, "solve_env_steps": self.solve_env_steps}

    def load_state_dict(self, state: dict, model: torch.nn.Module) -> None:
        """Restores what state_dict() saved and submits the evaluation that was in flight
        (of a copy of `model`'s weights as they were then) again."""
        self._next, self._count = state["next"], state["count"] - (state["evaluating"] is not None)
        self.last = EvalResult(**state["last"]) if state["last"] else None
        self.best_mean, self.last_full_at = state["best_mean"], state["last_full_at"]
        self.rolled_back_to = tuple(state["rolled_back_to"]) if state["rolled_back_to"] else None
        self.solved, self.solve_wall_s, self.solve_env_steps = (state["solved"], state["solve_wall_s"],
                                                                state["solve_env_steps"])
        if state["evaluating"] is not None:
            e = state["evaluating"]
            device = next(iter(model.state_dict().values())).device
            weights = {k: v.to(device) for k, v in e["weights"].items()}
            self._submit(weights, e["env_steps"], e["updates"], model, e["screen"])

    def close(self, terminate: bool = False) -> None:
        self._evaluator.close(terminate)
        self._evaluating = None
