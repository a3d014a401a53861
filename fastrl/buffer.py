"""Device-resident, preallocated, time-major replay storage.

Row layout of `ReplayRing` (T rows x N envs). The collector writes, per vector step,
    obs[t]       the state the action was taken in
    actions[t], rewards[t], terminated[t], dones[t] (= terminated | truncated)
    valid[t]     False for NEXT_STEP reset steps: obs[t] is then the *final*
                 observation of the previous episode, the action was ignored and
                 the reward is 0. Such rows get weight 0, so they are never learned from.
and obs[t+1] (the next state) at once, so the newest row is complete. With NEXT_STEP
autoreset the row after a done holds the final observation, which is exactly the
bootstrap state a truncated window needs.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from fastrl.errors import ConfigError
from fastrl.priorities import Priorities
from fastrl.returns import discounted_returns, nstep_targets


class RingStorage(NamedTuple):
    obs: torch.Tensor          # [T, N, *obs_shape] float32
    actions: torch.Tensor      # [T, N] int64
    rewards: torch.Tensor      # [T, N] float32
    terminated: torch.Tensor   # [T, N] bool
    dones: torch.Tensor        # [T, N] bool
    valid: torch.Tensor        # [T, N] bool


class Transitions(NamedTuple):
    """A sampled batch of n-step transitions (all [B, ...] on the training device)."""

    obs: torch.Tensor        # s_t
    actions: torch.Tensor    # a_t
    returns: torch.Tensor    # sum_{k<m} gamma^k r_{t+k}
    next_obs: torch.Tensor   # s_{t+m}, the bootstrap state
    discount: torch.Tensor   # gamma^m, 0 if the episode terminated inside the window
    weight: torch.Tensor     # 1.0 (by priority: its importance-sampling weight), 0.0 for reset pseudo-transitions


def transitions_at(storage: RingStorage, start: torch.Tensor, env: torch.Tensor, age: torch.Tensor,
                   n_step: int, gamma: float) -> Transitions:
    """The n-step transitions that start at rows `start` of envs `env` ([B] each).

    `age` [B] is how far each start row is behind the write head (1 = newest row):
    only rows start .. start+age-1 are complete, so windows stop there.
    """
    T = storage.rewards.shape[0]
    rows = torch.remainder(start.unsqueeze(1) + torch.arange(n_step, device=start.device), T)  # [B, n]
    cols = env.unsqueeze(1)
    ns = nstep_targets(storage.rewards[rows, cols], storage.dones[rows, cols],
                       storage.terminated[rows, cols], age, gamma)
    boot_row = torch.remainder(start + ns.steps, T)
    return Transitions(
        obs=storage.obs[start, env],
        actions=storage.actions[start, env],
        returns=ns.returns,
        next_obs=storage.obs[boot_row, env],
        discount=ns.discount,
        weight=storage.valid[start, env].to(torch.float32),
    )


def group_heads(head: torch.Tensor, env: torch.Tensor, num_envs: int) -> torch.Tensor:
    """The write head of each env's group, [B]: `head` [groups] holds the heads of equal
    groups of `num_envs` envs in env order, `env` [B] env indices."""
    return head[torch.div(env, num_envs // head.shape[0], rounding_mode="floor")]


def sample_transitions(storage: RingStorage, head: torch.Tensor, size: torch.Tensor,
                       batch_size: int, n_step: int, gamma: float) -> Transitions:
    """Uniformly samples `batch_size` transitions, each an env and one of its newest
    `min(size)` complete rows (ages 1..min(size) behind its group's head), and builds their
    n-step targets. `head` and `size` are [groups] device tensors (groups of equal width,
    in env order), so it is pure, fixed-shape and compiles once.

    Every env offers the same number of rows, so each transition is equally likely even
    while groups written out of step (ready-first) hold different numbers of rows: with
    each group's own size, a group a step behind would have its rows drawn more often.
    """
    T, N = storage.rewards.shape
    device = storage.rewards.device
    u = torch.rand(batch_size, device=device)
    env = torch.randint(0, N, (batch_size,), device=device)
    rows = size.min()
    age = 1 + torch.minimum((u * rows).long(), rows - 1)
    start = torch.remainder(group_heads(head, env, N) - age, T)
    return transitions_at(storage, start, env, age, n_step, gamma)


class ReplayRing:
    """Fixed-capacity ring of vector-env steps, allocated once on `device`.

    With `groups` > 1 the envs form that many equal groups (env order) that step
    independently, each with its own write head: a collector acting on each worker's
    group as soon as it is ready (see `Collector`) writes group rows with `add(..., group)`.

    With `per_alpha` > 0 it samples by priority (`priorities`, see fastrl.priorities),
    starting with importance-sampling exponent `per_beta`; else uniformly.
    """

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, device: torch.device,
                 n_step: int = 1, gamma: float = 0.99, groups: int = 1, per_alpha: float = 0.0,
                 per_beta: float = 0.4):
        # One row must stay free: the newest next-observation occupies row `head`.
        self.rows = max(2, math.ceil(capacity / num_envs) + 1)
        self.num_envs, self.n_step, self.gamma = num_envs, n_step, gamma
        T, N = self.rows, num_envs
        self.storage = RingStorage(
            obs=torch.zeros((T, N, *obs_shape), dtype=torch.float32, device=device),
            actions=torch.zeros((T, N), dtype=torch.int64, device=device),
            rewards=torch.zeros((T, N), dtype=torch.float32, device=device),
            terminated=torch.zeros((T, N), dtype=torch.bool, device=device),
            dones=torch.zeros((T, N), dtype=torch.bool, device=device),
            valid=torch.zeros((T, N), dtype=torch.bool, device=device),
        )
        self._prev_done = torch.zeros(N, dtype=torch.bool, device=device)
        self.written = [0] * groups  # host-side: steps written per group since the start
        self._head_t = torch.zeros(groups, dtype=torch.int64, device=device)
        self._size_t = torch.zeros(groups, dtype=torch.int64, device=device)
        # Per group, views of its envs' columns, made once: add() indexes only the row.
        G = N // groups
        self._group_cols = [slice(g * G, (g + 1) * G) for g in range(groups)]
        self._group_views = [(RingStorage(*(x[:, cols] for x in self.storage)), self._prev_done[cols],
                              self._head_t[g], self._size_t[g]) for g, cols in enumerate(self._group_cols)]
        self.priorities = Priorities(T, N, device, per_alpha, per_beta) if per_alpha > 0 else None

    @property
    def nbytes(self) -> int:
        """Bytes of storage on the device (a ring made on the "meta" device allocates none)."""
        return sum(x.nbytes for x in self.storage)

    def nonfinite_fields(self) -> list[str]:
        """The float fields (of `RingStorage`) holding a nan or an infinity anywhere: what
        the env gave, for a diverged run's error. Scanned a few million values at a time,
        so a large ring needs no full-size temporary."""
        def finite(x: torch.Tensor) -> bool:
            rows = max(1, 2**24 // max(1, x[0].numel()))
            return all(bool(torch.isfinite(chunk).all()) for chunk in x.split(rows))

        return [name for name, x in zip(RingStorage._fields, self.storage) if x.is_floating_point() and not finite(x)]

    @property
    def heads(self) -> list[int]:
        """The row each group's next step fills."""
        return [w % self.rows for w in self.written]

    @property
    def head(self) -> int:
        """The row the next step fills (of the first group; every group's in lockstep)."""
        return self.written[0] % self.rows

    @property
    def size(self) -> int:
        """Complete rows available as sample starts in every group (per env)."""
        return min(min(self.written), self.rows - 1)

    def __len__(self) -> int:
        """Complete transitions stored (all envs)."""
        per_group = self.num_envs // len(self.written)
        return sum(min(w, self.rows - 1) for w in self.written) * per_group

    def start(self, obs: torch.Tensor) -> None:
        """Writes the first observation of every env ([N, *obs_shape])."""
        self.storage.obs[self.head].copy_(obs)
        self._prev_done.zero_()

    def add(self, actions: torch.Tensor, rewards: torch.Tensor, terminated: torch.Tensor,
            truncated: torch.Tensor, next_obs: torch.Tensor, group: int = 0) -> None:
        """Completes row `heads[group]` of the group's envs with one of their steps ([G]
        each; next_obs [G, *obs]; in lockstep G = N)."""
        s, prev_done, head_t, size_t = self._group_views[group]
        t = self.written[group] % self.rows
        s.actions[t].copy_(actions)
        s.rewards[t].copy_(rewards)
        s.terminated[t].copy_(terminated)
        torch.logical_or(terminated, truncated, out=s.dones[t])
        torch.logical_not(prev_done, out=s.valid[t])
        prev_done.copy_(s.dones[t])
        written = self.written[group] = self.written[group] + 1
        head = written % self.rows
        s.obs[head].copy_(next_obs)
        head_t.fill_(head)
        size_t.fill_(min(written, self.rows - 1))
        if self.priorities is not None:
            self.priorities.written(t, head, s.valid[t], self._group_cols[group])

    def cut(self, obs: torch.Tensor) -> None:
        """Where a resumed run starts again ([N, *obs_shape], the envs' new first observations):
        every episode in progress ends at the last written row as a truncation, so no
        n-step window spans the cut and the last one bootstraps from its last observation,
        then `obs` is written as NEXT_STEP autoreset writes a reset (a row that is never
        learned from)."""
        G = self.num_envs // len(self.written)
        for g, (s, prev_done, _, _) in enumerate(self._group_views):
            if self.written[g] == 0:  # nothing written: the run had not stepped yet
                s.obs[0].copy_(obs[g * G:(g + 1) * G])
                continue
            s.dones[(self.written[g] - 1) % self.rows].fill_(True)
            prev_done.fill_(True)
            zeros = torch.zeros(G, device=obs.device)
            self.add(zeros.long(), zeros, zeros.bool(), zeros.bool(), obs[g * G:(g + 1) * G], g)

    def state_dict(self) -> dict:
        """The storage and its write heads, for a resumed run (CPU tensors)."""
        state = {"storage": {name: x.cpu() for name, x in zip(RingStorage._fields, self.storage)},
                 "prev_done": self._prev_done.cpu(), "written": list(self.written)}
        if self.priorities is not None:
            state["priorities"] = self.priorities.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() saved, in place (compiled steps keep their tensors)."""
        if len(state["written"]) != len(self.written):  # ready-first with automatic workers, on another machine
            raise ConfigError(f"the saved replay ring has {len(state['written'])} groups of envs (one per env "
                              f"worker), and this run made {len(self.written)}: resume with --num-workers "
                              f"{len(state['written'])}")
        for name, x in zip(RingStorage._fields, self.storage):
            x.copy_(state["storage"][name])
        self._prev_done.copy_(state["prev_done"])
        self.written[:] = state["written"]
        if self.priorities is not None:
            self.priorities.load_state_dict(state["priorities"])
        for g, written in enumerate(self.written):
            self._head_t[g].fill_(written % self.rows)
            self._size_t[g].fill_(min(written, self.rows - 1))

    def sample(self, batch_size: int) -> Transitions:
        if self.size < 1:
            raise RuntimeError("ReplayRing.sample() before any step was added")
        return self.sampler(batch_size)()

    def sampler(self, batch_size: int) -> Callable[[], Transitions]:
        """An argument-free sampling function reading only this ring's device tensors
        (head and size included), so a learner step can compile it in, or record it in a
        CUDA graph. The caller makes sure a step was added first."""
        storage, head, size, n_step, gamma = self.storage, self._head_t, self._size_t, self.n_step, self.gamma
        priorities = self.priorities
        if priorities is None:
            def sample() -> Transitions:
                return sample_transitions(storage, head, size, batch_size, n_step, gamma)

            return sample
        priorities.reserve(batch_size)
        T, N = self.rows, self.num_envs

        def sample_by_priority() -> Transitions:
            row, env, weight = priorities.draw(batch_size)
            age = torch.remainder(group_heads(head, env, N) - row, T)
            batch = transitions_at(storage, row, env, age, n_step, gamma)
            return batch._replace(weight=batch.weight * weight)

        return sample_by_priority


class Episodes(NamedTuple):
    """A fixed-size batch of a RolloutBuffer's steps: the oldest ready to learn from first."""

    obs: torch.Tensor       # [B, *obs_shape]
    actions: torch.Tensor   # [B]
    returns: torch.Tensor   # [B] full Monte-Carlo returns where `mask` is set
    mask: torch.Tensor      # [B] bool: a real step of an ended episode, not learned from before
    log_probs: torch.Tensor  # [B] the log-probability of the action under the policy that acted
    slots: torch.Tensor     # [B] each step's place in the ring, row * num_envs + env (for mark_learned)


class RolloutBuffer(ReplayRing):
    """The same device ring, used on-policy: each step is learned from once, at an
    update after its episode ended. Steps of an episode that is still running wait in
    the ring (carried over into the next rollout), so returns are never cut at a rollout
    boundary. `rows` must exceed the longest episode plus the steps written between two
    updates, or unfinished episodes would be overwritten.

    An update learns from a fixed-size batch (`batch_size` steps, so it compiles once and
    costs what the new steps cost, not what the whole ring holds): the oldest ready steps
    first, padding masked out. Ready steps beyond it wait for the next update; one still
    waiting when its row is written over is lost, so `batch_size` should be well above
    the steps a rollout writes.
    """

    def __init__(self, rows: int, num_envs: int, obs_shape: tuple, device: torch.device,
                 batch_size: int | None = None):
        super().__init__((rows - 1) * num_envs, num_envs, obs_shape, device)
        self.learned = torch.ones((self.rows, num_envs), dtype=torch.bool, device=device)
        self.log_probs = torch.zeros((self.rows, num_envs), device=device)
        # Per env, real steps written over before they were learned from (see take_lost).
        self._lost = torch.zeros(num_envs, dtype=torch.int64, device=device)
        self._lost_now = torch.zeros(num_envs, dtype=torch.bool, device=device)
        slots = (self.rows - 1) * num_envs  # every row but the head's
        self.batch_size = slots if batch_size is None else min(batch_size, slots)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.learned.nbytes + self.log_probs.nbytes

    def record_log_probs(self, log_probs: torch.Tensor) -> None:
        """Records the acting policy's log-probabilities of the actions the next add() writes."""
        self.log_probs[self.head].copy_(log_probs)

    def add(self, actions, rewards, terminated, truncated, next_obs, group: int = 0) -> None:
        row = self.head  # one group: on-policy rollouts step in lockstep
        # next_obs takes the oldest row: a real step there not yet learned from is lost.
        oldest = (row + 1) % self.rows
        torch.gt(self.storage.valid[oldest], self.learned[oldest], out=self._lost_now)
        self._lost.add_(self._lost_now)
        super().add(actions, rewards, terminated, truncated, next_obs, group)
        self.learned[row].fill_(False)

    def take_lost(self) -> torch.Tensor:
        """The real steps written over before they were learned from since the last call
        (0-d, on the device): none, unless episodes outlast the ring or ready steps pile
        up beyond what the batches take."""
        lost = self._lost.sum()
        self._lost.zero_()
        return lost

    def cut(self, obs: torch.Tensor) -> None:
        """As ReplayRing.cut, but the episodes in progress are dropped, not truncated: their
        returns are unknown, so their steps are never learned from."""
        if self.written[0] > 0:
            rows = self._rows_in_time_order()
            _, complete = discounted_returns(self.storage.rewards[rows], self.storage.dones[rows], 1.0)
            self.learned[rows] |= ~complete
        super().cut(obs)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "learned": self.learned.cpu(), "log_probs": self.log_probs.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.learned.copy_(state["learned"])
        if "log_probs" in state:  # absent from older saves: read as 0, which only lowers those steps' weights
            self.log_probs.copy_(state["log_probs"])

    def _rows_in_time_order(self) -> torch.Tensor:
        """Every row but the head's, oldest first."""
        return torch.remainder(self.head + 1 + torch.arange(self.rows - 1, device=self.learned.device), self.rows)

    def episodes(self, gamma: float) -> Episodes:
        """The next batch to learn from: returns over the whole ring, then the oldest
        `batch_size` ready steps (fixed shapes; the mask marks the real ones)."""
        rows = self._rows_in_time_order()
        s = self.storage
        returns, complete = discounted_returns(s.rewards[rows], s.dones[rows], gamma)
        ready = (complete & s.valid[rows] & ~self.learned[rows]).flatten()
        # A stable sort puts the ready steps first and keeps them in time order.
        take = torch.argsort((~ready).to(torch.int8), stable=True)[:self.batch_size]
        row, env = rows[take // self.num_envs], take % self.num_envs
        return Episodes(s.obs[row, env], s.actions[row, env], returns.flatten()[take], ready[take],
                        self.log_probs[row, env], row * self.num_envs + env)

    def mark_learned(self, batch: Episodes) -> None:
        flat = self.learned.view(-1)  # the slots of one batch are distinct
        flat.index_copy_(0, batch.slots, flat[batch.slots] | batch.mask)
