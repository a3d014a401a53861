"""Tiny deterministic envs whose observations say exactly where they are.

CounterEnv: obs = [episode number, step t within the episode, action at the last step].
Reward for a step that leads to t is t + 0.5 * action, so a stored reward names its step.
Episodes terminate after `length` steps (length=None: a length drawn from the seeded RNG
in [1, 6]); registered with a TimeLimit so long episodes are truncated instead.
"""
import os
from pathlib import Path

import gymnasium as gym
import numpy as np

_IMPORTED_BY = os.getpid()


class CounterEnv(gym.Env):
    def __init__(self, length=3, n_actions=2):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = gym.spaces.Discrete(n_actions)
        self.fixed_length = length
        self.episode = -1
        self.t = 0
        self.length = length

    def _obs(self, action=0.0):
        return np.array([self.episode, self.t, action], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        self.length = self.fixed_length or int(self.np_random.integers(1, 7))
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = self.t + 0.5 * int(action)
        return self._obs(int(action)), float(reward), self.t >= self.length, False, {}


class SlowEnv(CounterEnv):
    """CounterEnv that sleeps in step (for profiling tests)."""

    def __init__(self, delay=0.002, **kw):
        super().__init__(**kw)
        self.delay = delay

    def step(self, action):
        import time
        time.sleep(self.delay)
        return super().step(action)


class SlowResetEnv(CounterEnv):
    """CounterEnv that sleeps in reset."""

    def __init__(self, delay=0.2, **kw):
        super().__init__(**kw)
        self.delay = delay

    def reset(self, *, seed=None, options=None):
        import time
        time.sleep(self.delay)
        return super().reset(seed=seed, options=options)


class InfoEnv(CounterEnv):
    """CounterEnv that reports {"t": t} in info on even steps only."""

    def step(self, action):
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, reward, terminated, truncated, ({"t": self.t} if self.t % 2 == 0 else {})


class FailingResetEnv(CounterEnv):
    """CounterEnv whose resets after odd-numbered episodes raise, unless given a seed."""

    def reset(self, *, seed=None, options=None):
        if self.episode % 2 == 1 and seed is None:
            raise RuntimeError("reset failed on purpose")
        return super().reset(seed=seed, options=options)


class FailingStepEnv(CounterEnv):
    """CounterEnv whose 31st step (over all its episodes) raises: a bug in an env. The
    raising line holds a '%', which gymnasium's own error logging cannot print."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if self.steps > 30:
            raise ValueError("step %d failed on purpose" % self.steps)
        return super().step(action)


class OneFailingStepEnv(CounterEnv):
    """CounterEnv whose 31st step raises in one env only (the first to get there: it makes
    the file `failed` in the directory `mark`). Each env that stepped makes a file of its
    own in `mark` when closed, so a test can count the envs that were closed."""

    def __init__(self, mark, **kw):
        super().__init__(**kw)
        self.mark, self.steps = Path(mark), 0

    def step(self, action):
        self.steps += 1
        if self.steps == 31:
            try:
                os.close(os.open(self.mark / "failed", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                raise ValueError("this env failed, the others did not")
        return super().step(action)

    def close(self):
        if self.steps:
            import uuid
            (self.mark / f"closed-{uuid.uuid4().hex}").touch()


class FailingWhenEvaluatedEnv(CounterEnv):
    """CounterEnv whose resets with an evaluation's seeds (fastrl's start at 3e9) raise."""

    def reset(self, *, seed=None, options=None):
        if seed is not None and seed >= 3_000_000_000:
            raise ValueError("no simulator for evaluation seeds")
        return super().reset(seed=seed, options=options)


class NonFiniteEnv(CounterEnv):
    """CounterEnv whose observations (what="obs": nan) or rewards (what="reward": inf) stop
    being finite after its first `after` steps (over all its episodes): a bug in an env."""

    def __init__(self, after=100, what="obs", **kw):
        super().__init__(**kw)
        self.after, self.what, self.steps = after, what, 0

    def step(self, action):
        self.steps += 1
        obs, reward, terminated, truncated, info = super().step(action)
        if self.steps > self.after:
            if self.what == "obs":
                obs = np.full_like(obs, np.nan)
            else:
                reward = np.inf
        return obs, reward, terminated, truncated, info


class HangingEnv(CounterEnv):
    """CounterEnv whose step never returns after its first `after` steps (over all its
    episodes): a simulator stuck in a loop, or waiting on a server that is gone. With
    `mark`, each env hangs after making a file of its own in that directory."""

    def __init__(self, after=100, mark=None, ignore_sigterm=False, **kw):
        super().__init__(**kw)
        self.after, self.mark, self.steps = after, mark, 0
        self.ignore_sigterm = ignore_sigterm  # then SIGTERM cannot end the process once it hangs

    def step(self, action):
        import signal
        import time
        import uuid
        self.steps += 1
        if self.steps > self.after:
            if self.ignore_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if self.mark is not None:
                (Path(self.mark) / uuid.uuid4().hex).touch()
            time.sleep(3600)
        return super().step(action)


class UnmakeableEnv(CounterEnv):
    """CounterEnv that cannot be made (everywhere=False: in any process but the one that
    imported this module, like a licence only one process may hold; the env is then
    checked fine, and its env workers and evaluation process fail)."""

    def __init__(self, everywhere=True, **kw):
        if everywhere or os.getpid() != _IMPORTED_BY:
            raise RuntimeError("the licence is held by process %d" % _IMPORTED_BY)
        super().__init__(**kw)


class SimulatorError(Exception):
    """An error whose class takes more than a message, as many libraries' do: pickling
    keeps only the message, so it does not unpickle as itself."""

    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")


def _error_class(kind):
    if kind == "coded":
        return SimulatorError

    class LocalError(Exception):  # made on the fly: it does not pickle at all
        def __init__(self, code, detail):
            super().__init__(f"code {code}: {detail}")

    return LocalError


class SimulatorFailingEnv(CounterEnv):
    """CounterEnv that raises a SimulatorError (error="coded") or a LocalError (error="local")
    when made (when="making": in any process but the one that imported this module), at
    its 31st step (when="stepping"), when closed (when="closing") or when closed after a step
    (when="closing after use": a renderer or a solver made at the first step, say). Two
    joined by "+" both fail."""

    def __init__(self, when="stepping", error="coded", **kw):
        self.when, self.error, self.steps = set(when.split("+")), error, 0
        if "making" in self.when and os.getpid() != _IMPORTED_BY:
            raise _error_class(error)(3, "no licence")
        super().__init__(**kw)

    def step(self, action):
        self.steps += 1
        if "stepping" in self.when and self.steps > 30:
            raise _error_class(self.error)(7, "the solver diverged")
        return super().step(action)

    def close(self):
        if "closing" in self.when or ("closing after use" in self.when and self.steps):
            raise _error_class(self.error)(5, "no handle to free")


class WrongOutputEnv(CounterEnv):
    """CounterEnv whose reset() or step() returns what gymnasium's API does not allow:
    wrong="old reset" (the observation alone, as the old gym API had it), "obs shape" (an
    observation of shape (4,), not (3,)), "scalar obs" (a scalar, which numpy would
    broadcast into a row of 3) or "reward" (a vector, as multi-objective envs return)."""

    def __init__(self, wrong="old reset", **kw):
        super().__init__(**kw)
        self.wrong = wrong

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        if self.wrong == "old reset":
            return obs
        if self.wrong in ("obs shape", "scalar obs"):
            return (np.zeros(4, np.float32) if self.wrong == "obs shape" else np.float32(1.0)), info
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, (np.array([reward, -1.0]) if self.wrong == "reward" else reward), terminated, truncated, info


# Terminates after 3 steps (never truncated).
class RandomEndEnv(gym.Env):
    """One unchanging observation [1.0]. Action 0 pays 0.1, action 1 pays 0.05; after either
    the episode terminates with probability 0.1 (the env's seeded RNG). Registered with a
    time limit of 5 steps, so most episodes are truncated and the rest terminate. With
    discount gamma the true values are Q(0) = 0.1 / (1 - 0.9 gamma) and
    Q(1) = 0.05 + 0.9 gamma Q(0): for gamma = 0.9, 0.526 and 0.476. (Small rewards keep
    every TD error inside the Huber loss's quadratic part, whose minimum is the mean
    target: beyond it the loss is robust, and its fixed point is no longer the mean.)"""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.ones(1, np.float32), {}

    def step(self, action):
        reward = 0.1 if int(action) == 0 else 0.05
        return np.ones(1, np.float32), reward, bool(self.np_random.random() < 0.1), False, {}


gym.register("fastrl-test/Terminating-v0", entry_point=CounterEnv, kwargs={"length": 3}, max_episode_steps=100)
# Would last 50 steps but the time limit truncates it after 4.
gym.register("fastrl-test/Truncating-v0", entry_point=CounterEnv, kwargs={"length": 50}, max_episode_steps=4)
# Random lengths 1..6, truncated at 5: both kinds of episode end.
gym.register("fastrl-test/Mixed-v0", entry_point=CounterEnv, kwargs={"length": None}, max_episode_steps=5)
gym.register("fastrl-test/Info-v0", entry_point=InfoEnv, kwargs={"length": 4}, max_episode_steps=50)
gym.register("fastrl-test/Slow-v0", entry_point=SlowEnv, kwargs={"length": 20}, max_episode_steps=50)
gym.register("fastrl-test/FailingReset-v0", entry_point=FailingResetEnv, kwargs={"length": 3}, max_episode_steps=50)
gym.register("fastrl-test/SlowReset-v0", entry_point=SlowResetEnv, kwargs={"length": 3}, max_episode_steps=50)
gym.register("fastrl-test/FailingStep-v0", entry_point=FailingStepEnv, kwargs={"length": 3}, max_episode_steps=50)
gym.register("fastrl-test/OneFailingStep-v0", entry_point=OneFailingStepEnv, kwargs={"length": 3},
             max_episode_steps=50)
gym.register("fastrl-test/FailingWhenEvaluated-v0", entry_point=FailingWhenEvaluatedEnv, kwargs={"length": 3},
             max_episode_steps=50)
gym.register("fastrl-test/NanObs-v0", entry_point=NonFiniteEnv, kwargs={"length": 3, "what": "obs"},
             max_episode_steps=50)
gym.register("fastrl-test/InfReward-v0", entry_point=NonFiniteEnv, kwargs={"length": 3, "what": "reward"},
             max_episode_steps=50)
gym.register("fastrl-test/Hanging-v0", entry_point=HangingEnv, kwargs={"length": 3}, max_episode_steps=50)
gym.register("fastrl-test/Unmakeable-v0", entry_point=UnmakeableEnv, max_episode_steps=50)
gym.register("fastrl-test/UnmakeableInWorkers-v0", entry_point=UnmakeableEnv, kwargs={"everywhere": False},
             max_episode_steps=50)
gym.register("fastrl-test/SimulatorFailing-v0", entry_point=SimulatorFailingEnv, kwargs={"length": 3},
             max_episode_steps=50)
gym.register("fastrl-test/WrongOutput-v0", entry_point=WrongOutputEnv, kwargs={"length": 3}, max_episode_steps=50,
             disable_env_checker=True)  # the checker's warnings are not what is tested
gym.register("fastrl-test/RandomEnd-v0", entry_point=RandomEndEnv, max_episode_steps=5)
