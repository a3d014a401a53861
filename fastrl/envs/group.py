"""The stepping loop shared by the sync backend and every async worker (`EnvGroup`),
and the sync backend itself (`InProcessVectorEnv`).

fastrl relies on NEXT_STEP autoreset: the step after an episode ends returns that
episode's *final* observation as the state, takes no action and pays reward 0, and
only then the reset observation. The replay ring keeps the final observation
(truncated episodes bootstrap from it) and marks that reset step as a
pseudo-transition that is never learned from.
"""
from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from fastrl.envs.spec import env_name
from fastrl.errors import BadEnvOutput, EnvCloseError, EnvError

AUTORESET = gym.vector.AutoresetMode.NEXT_STEP


class EnvGroup:
    """Steps a list of envs with NEXT_STEP autoreset, exactly as gymnasium's vector envs
    step each of theirs, into preallocated arrays. The sync backend runs one group in
    this process; each async worker runs one in its own.

    Autoresets can run early: `reset_ended()` resets the envs whose episode just ended
    and keeps the results for the next step(), which then only hands them out. Async
    workers call it right after replying, so the resets run while the trainer works, off
    the next step's critical path. The transitions are the same: the next step would make the very same call.
    """

    def __init__(self, envs: list[gym.Env], observation_space: gym.spaces.Box):
        n = len(envs)
        self.envs = envs
        self.obs = np.zeros(observation_space.shape, dtype=observation_space.dtype)  # [n, *obs]
        self.rewards = np.zeros(n, dtype=np.float64)
        self.terminated = np.zeros(n, dtype=np.bool_)
        self.truncated = np.zeros(n, dtype=np.bool_)
        self._autoreset = np.zeros(n, dtype=np.bool_)
        # Env j's early reset: ((obs, info) or the exception it raised, its RNG state before).
        self._early: list[tuple | None] = [None] * n

    def reset(self, seeds: list, options: dict | None) -> list[tuple[int, dict]]:
        """Resets env j with seeds[j]; returns the non-empty infos as (j, info) pairs.

        An env that already reset early: with no seed and no options, that reset is the
        one this call would make, so its result is used; otherwise its RNG goes back to
        the state before it and the env resets again, which gives what the plain path
        gives for envs whose reset depends only on its arguments and RNG (gymnasium's)."""
        infos = []
        try:
            for j, env in enumerate(self.envs):
                if self._early[j] is not None and seeds[j] is None and options is None:
                    out = self._take_early(j)
                else:
                    self._undo_early(j)
                    out = env.reset(seed=seeds[j], options=options)
                self.obs[j], info = self._checked_reset(j, out)
                if info:
                    infos.append((j, info))
        except Exception as exc:  # the env's own error, with its traceback
            raise EnvError.of(exc) from None
        self._autoreset[:] = False
        return infos

    def reset_ended(self) -> None:
        """Runs now the autoresets that the next step() would run (see the class docstring)."""
        for j in np.flatnonzero(self._autoreset).tolist():
            if self._early[j] is None:
                env = self.envs[j]
                rng_state = env.np_random.bit_generator.state
                try:
                    result = env.reset()
                except Exception as exc:  # raised where the plain path raises it: at the next step
                    result = exc
                self._early[j] = (result, rng_state)

    def _take_early(self, j: int) -> tuple:
        (result, _), self._early[j] = self._early[j], None
        if isinstance(result, Exception):
            raise result
        return result

    def _undo_early(self, j: int) -> None:
        # Forgets env j's early reset, if any, and puts its RNG back to the state before it.
        if self._early[j] is not None:
            (_, rng_state), self._early[j] = self._early[j], None
            self.envs[j].np_random.bit_generator.state = rng_state

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> list[tuple[int, dict]]:
        """Steps env j with actions[j] (or resets it, if its episode ended last step);
        returns the non-empty infos as (j, info) pairs. With `active` [n] bool, the envs
        not active are left as they are: their rows keep their last step, and a pending
        autoreset waits for their next step."""
        obs, rewards, terminated, truncated, autoreset = (
            self.obs, self.rewards, self.terminated, self.truncated, self._autoreset)
        infos = []
        try:
            for j, (env, action) in enumerate(zip(self.envs, actions.tolist())):  # Python ints: cheaper checks
                if active is not None and not active[j]:
                    continue
                if autoreset[j]:
                    out = env.reset() if self._early[j] is None else self._take_early(j)
                    obs[j], info = self._checked_reset(j, out)
                    rewards[j], terminated[j], truncated[j] = 0.0, False, False
                else:
                    out = env.step(action)
                    try:
                        obs[j], rewards[j], terminated[j], truncated[j], info = out
                    except (ValueError, TypeError) as exc:
                        raise self._bad_output(j, "step", out, exc) from None
                if info:
                    infos.append((j, info))
        except Exception as exc:  # the env's own error (in its step or autoreset), with its traceback
            raise EnvError.of(exc) from None
        np.logical_or(terminated, truncated, out=autoreset)
        return infos

    def _checked_reset(self, j: int, out: Any) -> tuple:
        # Checked once per episode: an observation of a wrong shape that numpy would
        # broadcast into its row without a word (a scalar, shape (1,)) is caught too.
        if not (isinstance(out, tuple) and len(out) == 2 and np.shape(out[0]) == self.obs.shape[1:]):
            raise self._bad_output(j, "reset", out)
        return out

    def _bad_output(self, j: int, call: str, out: Any, exc: Exception | None = None) -> BadEnvOutput:
        """Says what is wrong with what env j's reset() or step() returned, which does not
        fit gymnasium's API (an env written for the old gym API, often)."""
        name = env_name(self.envs[j])
        form = "(obs, info)" if call == "reset" else "(obs, reward, terminated, truncated, info)"
        if not isinstance(out, tuple) or len(out) != form.count(",") + 1:
            got = f"{len(out)} values" if isinstance(out, tuple) else f"a value of type {type(out).__name__}"
            old_api = isinstance(out, np.ndarray) if call == "reset" else isinstance(out, tuple) and len(out) == 4
            old = " (the old gym API's, which this env follows)" if old_api else ""
            what = f"{got}, not {form} as gymnasium's API (since gym 0.26) has it{old}"
        elif np.shape(out[0]) != self.obs.shape[1:]:
            what = (f"an observation of shape {np.shape(out[0])}, and its observation_space has shape "
                    f"{self.obs.shape[1:]}")
        else:
            bad = next(((k, v) for k, v in zip(("reward", "terminated", "truncated"), out[1:4])
                        if np.ndim(v) != 0 or np.asarray(v).dtype.kind not in "biuf"), None)
            what = f"a {bad[0]} of {bad[1]!r}, which is not a single number" if bad else f"what does not fit: {exc}"
        return BadEnvOutput(f"{name}'s {call}() returned {what}")


class InProcessVectorEnv(gym.vector.VectorEnv):
    """The sync backend: `len(env_fns)` envs in this process, one `EnvGroup`. Env i gets
    seed `seed + i`, as in gymnasium's vector envs. Like `copy=False` there, every step
    returns the same observation array."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]):
        envs = []
        try:
            for fn in env_fns:
                envs.append(fn())
        except BaseException:
            for env in envs:  # those made before the one that failed
                env.close()
            raise
        self.num_envs = len(envs)
        self.single_observation_space = envs[0].observation_space
        self.single_action_space = envs[0].action_space
        self.metadata = {**envs[0].metadata, "autoreset_mode": AUTORESET}
        self.render_mode = envs[0].render_mode
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.group = EnvGroup(envs, self.observation_space)

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        return self.group.obs, merge_infos(self, self.group.reset(seed, options), {})

    def step(self, actions, active: np.ndarray | None = None):
        """gymnasium's step; `active` [N] bool steps only those envs (see EnvGroup.step)."""
        g = self.group
        infos = g.step(np.asarray(actions), active)
        return g.obs, g.rewards.copy(), g.terminated.copy(), g.truncated.copy(), merge_infos(self, infos, {})

    def close_extras(self, **kwargs: Any) -> None:
        failed = []
        for env in self.group.envs:  # every one, though one before it failed
            try:
                env.close()
            except Exception as exc:  # its own frames only: not the error a run may be ending with
                failed.append(EnvCloseError.of(exc, failed=f"{env_name(env)} could not be closed", chain=False))
        if failed:
            self.closed = True
            raise failed[0]


def merge_infos(vector_env: gym.vector.VectorEnv, pairs, infos: dict, offset: int = 0) -> dict:
    """Adds (env j, info) pairs to gymnasium's batched infos (with `_key` masks) as env offset + j,
    with the helper every gymnasium VectorEnv uses for it."""
    for j, info in pairs:
        infos = vector_env._add_info(infos, info, offset + j)
    return infos
