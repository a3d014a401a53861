"""Prioritised replay (Schaul et al., 2016) over a `ReplayRing`'s slots, on the device.

Slot (t, i), row t of env i, is drawn with probability P = p / sum(p), where p = (|TD
error| + eps) ** alpha from the last time it was learned from, and a new transition
gets the largest p given so far, so it is drawn soon. Each draw is weighed by the
importance-sampling weight (P / P_min) ** -beta, P_min the batch's smallest, which
undoes the bias of the priorities as beta goes to 1 (the training loop anneals it).

Slots that cannot be learned from have p = 0: reset pseudo-steps, rows not written yet,
and each group's head row, whose next observation is being written.

Drawing works on two levels, so that an update reads O(rows + batch x envs) values, not
every slot: a row by the running sums of the rows' priorities, then an env within it.
"""
from __future__ import annotations

import torch


class Priorities:
    """The priorities of a ring's [rows, envs] slots, with their per-row sums (recomputed
    from the slots on every change, so no rounding error builds up)."""

    def __init__(self, rows: int, num_envs: int, device: torch.device, alpha: float, beta: float,
                 eps: float = 1e-3):
        self.alpha, self.eps = alpha, eps
        self.p = torch.zeros((rows, num_envs), dtype=torch.float32, device=device)
        self.row_sums = torch.zeros(rows, dtype=torch.float64, device=device)
        self.max_p = torch.ones((), dtype=torch.float32, device=device)  # what a new transition gets
        self.beta = torch.tensor(beta, dtype=torch.float32, device=device)  # the loop anneals it in place
        # The slots of the last draw, where `learned` writes: sized by `reserve`.
        self.drawn_row = self.drawn_env = torch.zeros(0, dtype=torch.int64, device=device)

    def reserve(self, batch_size: int) -> None:
        """Room for the slots of a draw of `batch_size` (one learner per ring)."""
        self.drawn_row = torch.zeros(batch_size, dtype=torch.int64, device=self.p.device)
        self.drawn_env = torch.zeros(batch_size, dtype=torch.int64, device=self.p.device)

    def written(self, row: int, head: int, valid: torch.Tensor, cols: slice) -> None:
        """Env columns `cols` completed row `row` (their reset pseudo-steps are not `valid`)
        and began row `head`."""
        torch.mul(valid, self.max_p, out=self.p[row, cols])
        self.p[head, cols] = 0.0
        self.row_sums[row] = self.p[row].sum()
        self.row_sums[head] = self.p[head].sum()

    def draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`batch_size` slots drawn with replacement in proportion to p: (rows, envs,
        importance-sampling weights), [B] each. A weight is 0 for a slot of p = 0, which
        only rounding at a boundary can draw."""
        rows, envs = self.p.shape
        ends = torch.cumsum(self.row_sums, 0)
        u = torch.rand(batch_size, dtype=torch.float64, device=self.p.device) * ends[-1]
        row = torch.searchsorted(ends, u, right=True).clamp_max(rows - 1)
        within = u - (ends[row] - self.row_sums[row])  # how far into the row's span u falls
        env_ends = torch.cumsum(self.p[row].double(), 1)  # [B, envs]
        env = (env_ends <= within.unsqueeze(1)).sum(1).clamp_max(envs - 1)
        p = self.p[row, env]
        drawn = p > 0
        p_min = torch.where(drawn, p, torch.inf).min()
        weight = torch.where(drawn, (p / p_min) ** -self.beta, 0.0)
        self.drawn_row.copy_(row)
        self.drawn_env.copy_(env)
        return row, env, weight

    def learned(self, td_error: torch.Tensor, learned: torch.Tensor) -> None:
        """New priorities for the slots of the last draw from their TD errors [B]; slots
        not `learned` from (weight 0: p = 0, or a reset pseudo-step) keep p = 0. A slot
        drawn twice gets the same value twice."""
        row, env = self.drawn_row, self.drawn_env
        p = torch.where(learned, (td_error.abs() + self.eps) ** self.alpha, 0.0)
        self.p[row, env] = p
        self.row_sums[row] = self.p[row].sum(1).double()
        torch.maximum(self.max_p, p.max(), out=self.max_p)

    def state_dict(self) -> dict:
        return {"p": self.p.cpu(), "max_p": self.max_p.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.p.copy_(state["p"])
        self.max_p.copy_(state["max_p"])
        self.row_sums.copy_(self.p.sum(1))
