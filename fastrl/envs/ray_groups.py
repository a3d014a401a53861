"""The ray backend: env groups as Ray actors, on any node of a cluster, acted for
centrally. Each actor steps its group of envs with the same `EnvGroup` as a local
grouped worker (NEXT_STEP autoreset, truncation, final observations, infos), one call
per group step, and sends back one batched array per field; the trainer acts for all
groups on its own device and, with ready-first collection, takes each group's step as
it arrives (`send_group`, `ready_groups`, `recv_group`, as the grouped async backend).

Env i is env i % G of group i // G and gets seed `seed + i`, as in every backend, so the
transitions are the same for the same seeds and actions. An env's own error comes back
as a value (its EnvError, with its traceback); an actor or node that dies is a
WorkerDied naming the group and its node.
"""
from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from fastrl import cluster
from fastrl.envs.group import AUTORESET, InProcessVectorEnv, merge_infos
from fastrl.envs.spec import make_env
from fastrl.errors import EnvCloseError, EnvError, WorkerDied
from fastrl.system import cpu_cores

CLOSE_TIMEOUT_S = 10.0  # for the envs' own close(); the actors are killed after it either way


class EnvGroupActor:
    """One group of envs in a Ray actor. Errors the envs raise are returned, not raised:
    an EnvError crosses as itself (Ray would wrap it in its own error type)."""

    def __init__(self, env_id: str, env_kwargs: dict, size: int):
        self.args = env_id, env_kwargs, size
        self.envs: InProcessVectorEnv | None = None

    def make(self):
        """Makes the envs: (observation space, action space, metadata, (this node's IP, its Ray id))."""
        import ray

        env_id, env_kwargs, size = self.args
        try:
            self.envs = InProcessVectorEnv([partial(make_env, env_id, env_kwargs)] * size)
        except EnvError as exc:
            return exc
        envs = self.envs
        node = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
        return envs.single_observation_space, envs.single_action_space, envs.metadata, node

    def reset(self, seeds: list, options: dict | None):
        try:
            infos = self.envs.group.reset(seeds, options)
        except EnvError as exc:
            return exc
        return self.envs.group.obs, infos

    def step(self, actions: np.ndarray):
        group = self.envs.group
        try:
            infos = group.step(actions)
        except EnvError as exc:
            return exc
        return group.obs, group.rewards, group.terminated, group.truncated, infos

    def close(self):
        try:
            if self.envs is not None:
                self.envs.close()
        except EnvError as exc:
            return exc
        return None


class RayVectorEnv(gym.vector.VectorEnv):
    """`num_envs` envs in `num_workers` Ray actors (one CPU each, spread over the nodes),
    an equal group per actor, on the cluster at `address` (see `fastrl.cluster.connect`:
    empty = RAY_ADDRESS's, else a local instance started here and shut down on close)."""

    def __init__(self, env_id: str, env_kwargs: dict, num_envs: int, num_workers: int, address: str = ""):
        self.num_envs, self.num_workers = num_envs, num_workers
        self.group_size = G = num_envs // num_workers
        self.closed = False
        self._owns_ray = cluster.connect(address, num_cpus=max(num_workers, cpu_cores()))
        import ray

        self._ray = ray
        self.actors: list = []
        try:
            cluster.check_cpus(num_workers, f"--backend ray with {num_workers} env groups (num_workers, one CPU each)")
            actor = ray.remote(num_cpus=1, max_restarts=0)(EnvGroupActor).options(scheduling_strategy="SPREAD")
            self.actors = [actor.remote(env_id, env_kwargs, G) for _ in range(num_workers)]
            made = [self._result(w, ref) for w, ref in enumerate([a.make.remote() for a in self.actors])]
        except BaseException:
            self._shut_down()
            raise
        obs_space, act_space, metadata, _ = made[0]
        self.nodes = [m[3] for m in made]  # each group's node: (IP, Ray node id)
        self.single_observation_space, self.single_action_space = obs_space, act_space
        self.metadata = {**metadata, "autoreset_mode": AUTORESET}
        self.observation_space = batch_space(obs_space, num_envs)
        self.action_space = batch_space(act_space, num_envs)
        self._obs = np.zeros(self.observation_space.shape, self.observation_space.dtype)
        self._rewards = np.zeros(num_envs, np.float64)
        self._terminated = np.zeros(num_envs, np.bool_)
        self._truncated = np.zeros(num_envs, np.bool_)
        self._pending: list = [None] * num_workers  # group w's step in flight: its ObjectRef

    def _result(self, w: int, ref):
        """What actor w's call returned; its env's error raised; its death a WorkerDied."""
        try:
            out = self._ray.get(ref)
        except self._ray.exceptions.RayActorError as exc:
            node = f" on node {self.nodes[w][0]}" if getattr(self, "nodes", None) else ""
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerDied(f"env group {w} (a Ray actor{node}) ended unexpectedly: {cause}") from None
        if isinstance(out, EnvError):
            raise out
        return out

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        if any(ref is not None for ref in self._pending):
            raise gym.error.AlreadyPendingCallError("Calling `reset` while waiting for a pending call to `step`",
                                                    "step")
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        G = self.group_size
        refs = [a.reset.remote(seed[w * G:(w + 1) * G], options) for w, a in enumerate(self.actors)]
        infos = {}
        for w, ref in enumerate(refs):
            obs, pairs = self._result(w, ref)
            self._obs[w * G:(w + 1) * G] = obs
            infos = merge_infos(self, pairs, infos, w * G)
        return self._obs, infos

    def step_async(self, actions) -> None:
        actions = np.asarray(actions).reshape(self.num_workers, self.group_size)
        for w in range(self.num_workers):
            self.send_group(w, actions[w])

    def step_wait(self, timeout: float | None = None):
        if all(ref is None for ref in self._pending):
            raise gym.error.NoAsyncCallError("Calling `step_wait` without any prior call to `step_async`", "step")
        infos = {}
        for w in range(self.num_workers):
            if self._pending[w] is not None:
                *_, pairs = self.recv_group(w)
                infos = merge_infos(self, pairs, infos, w * self.group_size)
        return self._obs, self._rewards, self._terminated, self._truncated, infos

    def send_group(self, w: int, actions) -> None:
        """Sends group w its actions [G] (no step of that group may be pending)."""
        if self.closed:
            raise gym.error.ClosedEnvironmentError("RayVectorEnv: a step after close()")
        if self._pending[w] is not None:
            raise gym.error.AlreadyPendingCallError(f"env group {w} is still stepping", "step")
        self._pending[w] = self.actors[w].step.remote(np.asarray(actions, dtype=np.int64))

    def ready_groups(self) -> list[int]:
        """The groups whose step has arrived, waiting until there is at least one."""
        pending = [ref for ref in self._pending if ref is not None]
        if not pending:
            raise gym.error.NoAsyncCallError("Calling `ready_groups` without any step in flight", "step")
        self._ray.wait(pending, num_returns=1)
        ready, _ = self._ray.wait(pending, num_returns=len(pending), timeout=0)
        ready = set(ready)
        return [w for w, ref in enumerate(self._pending) if ref is not None and ref in ready]

    def recv_group(self, w: int):
        """Group w's step: (obs [G, *obs], rewards, terminated, truncated, its (env-in-group,
        info) pairs), the arrays views into this env's own, reused by the group's next step."""
        ref, self._pending[w] = self._pending[w], None
        obs, rewards, terminated, truncated, pairs = self._result(w, ref)
        c = slice(w * self.group_size, (w + 1) * self.group_size)
        self._obs[c], self._rewards[c], self._terminated[c], self._truncated[c] = obs, rewards, terminated, truncated
        return self._obs[c], self._rewards[c], self._terminated[c], self._truncated[c], pairs

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Closes the envs (unless `terminate`), then ends the actors, and the local Ray
        instance if this env started it. An env's close() error is raised last."""
        failed = None
        try:
            if not terminate and self.actors:
                ray = self._ray
                refs = [a.close.remote() for a in self.actors]
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout or CLOSE_TIMEOUT_S)
                for ref in done:
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        continue  # already dead: nothing of it to close
                    if isinstance(out, EnvError) and failed is None:
                        failed = EnvCloseError(str(out), out.trace, out.error_type)
        finally:
            self._shut_down()
        if failed is not None:
            raise failed

    def _shut_down(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

