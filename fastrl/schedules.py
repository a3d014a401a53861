"""Training-time schedules (epsilon, learning rate), computed on the host each step
and written in place into device tensors."""
from __future__ import annotations

import math

from fastrl.config import TrainConfig


def linear_schedule(step: int, start: float, end: float, duration: int) -> float:
    """Linear from `start` to `end` over `duration` env steps, then flat."""
    if step >= duration:
        return end
    return start + step / duration * (end - start)


def learning_rate(c: TrainConfig, env_steps: int) -> float:
    """`lr`, annealed linearly to `lr_end` at `total_steps` when `lr_end` is set."""
    return c.lr if math.isnan(c.lr_end) else linear_schedule(env_steps, c.lr, c.lr_end, c.total_steps)
