"""The ray backend: env groups as Ray actors, on any node of a cluster, acted for
centrally. Ray places the actors (one CPU each, spread over the nodes), starts them,
and says why one died; the steps themselves go over a TCP connection from each actor to
the trainer, as raw bytes, the way the local grouped workers use their pipes: a Ray
actor call costs more of Ray's own machinery than a group of small envs takes to step
(`benchmarks/ray_overhead.py` measures both). Ray's docs call this pattern out-of-band
communication.

Each actor steps its group with the same `EnvGroup` as a local worker (NEXT_STEP
autoreset, truncation, final observations, infos; autoresets run right after the
reply), and sends back one message per group step: observations, rewards and flags as
one batched buffer. The trainer acts for all groups on its own device and, with
ready-first collection, takes each group's step as it arrives (`send_group`,
`ready_groups`, `recv_group`, as the grouped async backend). Env i is env i % G of group
i // G and gets seed `seed + i`, as in every backend: the same transitions for the same
seeds and actions. An env's error comes back as its EnvError, with its traceback; an
actor or a node that dies is a WorkerDied naming the group, its node and Ray's reason.
"""
from __future__ import annotations

import math
import multiprocessing.connection as mpc
import os
import socket
from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from fastrl import cluster
from fastrl.envs.group import AUTORESET, InProcessVectorEnv, merge_infos
from fastrl.envs.spec import make_env
from fastrl.envs.workers import _STEP, GroupedVectorEnv, StepRequest, receive
from fastrl.errors import EnvCloseError, EnvError, WorkerDied
from fastrl.system import cpu_cores

CONNECT_TIMEOUT_S = 120.0  # for every actor to dial back once made (a busy cluster is slow to start them)
CLOSE_TIMEOUT_S = 10.0  # for the envs' own close(); the actors are killed after it either way


class StepReply:
    """One group's step as it travels back: [_STEP | obs | rewards f64 | terminated | truncated],
    the arrays views into `buffer` (obs padded to 8 bytes, so each array stays aligned)."""

    def __init__(self, group_size: int, obs_shape: tuple, obs_dtype: np.dtype):
        G, count = group_size, group_size * math.prod(obs_shape)
        obs_bytes = -(-count * np.dtype(obs_dtype).itemsize // 8) * 8
        self.buffer = bytearray(_STEP + bytes(obs_bytes + 10 * G))
        o = len(_STEP)
        self.obs = np.frombuffer(self.buffer, obs_dtype, count, o).reshape(G, *obs_shape)
        self.rewards = np.frombuffer(self.buffer, np.float64, G, o + obs_bytes)
        self.terminated = np.frombuffer(self.buffer, np.bool_, G, o + obs_bytes + 8 * G)
        self.truncated = np.frombuffer(self.buffer, np.bool_, G, o + obs_bytes + 9 * G)


def _connection(sock: socket.socket) -> mpc.Connection:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a step is one small message each way
    sock.settimeout(None)
    return mpc.Connection(sock.detach())


class EnvGroupActor:
    """One group of envs in a Ray actor: made by `make()`, then stepped by `serve()` over
    its connection to the trainer until the trainer closes it."""

    def __init__(self, env_id: str, env_kwargs: dict, size: int):
        self.args = env_id, env_kwargs, size
        self.envs: InProcessVectorEnv | None = None

    def make(self):
        """Makes the envs: (observation space, action space, metadata, (node IP, Ray node id)),
        or the EnvError of an env that could not be made."""
        import ray

        env_id, env_kwargs, size = self.args
        try:
            self.envs = InProcessVectorEnv([partial(make_env, env_id, env_kwargs)] * size)
        except EnvError as exc:
            return exc
        envs = self.envs
        node = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
        return envs.single_observation_space, envs.single_action_space, envs.metadata, node

    def serve(self, address: tuple, authkey: bytes, index: int) -> None:
        """Dials the trainer at `address`, then answers its messages: raw step requests, and
        pickled (command, data) pairs for reset and close, as a local grouped worker does."""
        conn = _connection(socket.create_connection(address, timeout=CONNECT_TIMEOUT_S))
        mpc.answer_challenge(conn, authkey)
        conn.send(index)
        envs, group = self.envs, self.envs.group
        space = envs.single_observation_space
        request = StepRequest(envs.num_envs)
        reply = StepReply(envs.num_envs, space.shape, space.dtype)
        # The group writes its step results straight into the reply message.
        group.obs, group.rewards, group.terminated, group.truncated = (
            reply.obs, reply.rewards, reply.terminated, reply.truncated)
        try:
            while True:
                try:
                    message = receive(conn, request.buffer)
                except EOFError:  # the trainer is gone (killed): nothing left to serve
                    return
                try:
                    if message is None:  # a step
                        infos = group.step(request.actions)
                        if infos:
                            conn.send(((group.obs, group.rewards, group.terminated, group.truncated, infos), True))
                        else:
                            conn.send_bytes(reply.buffer)
                        group.reset_ended()  # while the trainer works
                        continue
                    command, data = message
                    if command == "reset":
                        infos = group.reset(*data)
                        conn.send(((group.obs, infos), True))
                    elif command == "close":
                        envs.close()
                        conn.send((None, True))
                        return
                except EnvError as exc:
                    conn.send((exc, False))
                    if message is not None and message[0] == "close":
                        return
        finally:
            conn.close()


class RayVectorEnv(GroupedVectorEnv):
    """`num_envs` envs in `num_workers` Ray actors (one CPU each, spread over the nodes),
    an equal group per actor, on the cluster at `address` (see `fastrl.cluster.connect`:
    empty = RAY_ADDRESS's, else a local instance started here and shut down on close)."""

    def __init__(self, env_id: str, env_kwargs: dict, num_envs: int, num_workers: int, address: str = ""):
        self.num_envs, self.num_workers = num_envs, num_workers
        self.group_size = G = num_envs // num_workers
        self.closed = False
        self.actors, self.conns, self._serving, self.nodes = [], [], [], []
        self._owns_ray = cluster.connect(address, num_cpus=max(num_workers, cpu_cores()))
        import ray

        self._ray = ray
        try:
            cluster.check_cpus(num_workers, f"--backend ray with {num_workers} env groups (num_workers, one CPU each)")
            actor = ray.remote(num_cpus=1, max_restarts=0)(EnvGroupActor).options(scheduling_strategy="SPREAD")
            self.actors = [actor.remote(env_id, env_kwargs, G) for _ in range(num_workers)]
            made = [self._result(w, ref) for w, ref in enumerate([a.make.remote() for a in self.actors])]
            self.nodes = [m[3] for m in made]  # each group's node: (IP, Ray node id)
            obs_space, act_space, metadata, _ = made[0]
            self._connect()
        except BaseException:
            self._shut_down()
            raise
        self.single_observation_space, self.single_action_space = obs_space, act_space
        self.metadata = {**metadata, "autoreset_mode": AUTORESET}
        self.observation_space = batch_space(obs_space, num_envs)
        self.action_space = batch_space(act_space, num_envs)
        self._init_groups()
        self._replies = [StepReply(G, obs_space.shape, obs_space.dtype) for _ in range(num_workers)]
        # step_wait()'s arrays [N]: every group's reply copied in, no allocation
        self._obs = np.zeros(self.observation_space.shape, self.observation_space.dtype)
        self._rewards = np.zeros(num_envs, np.float64)
        self._terminated = np.zeros(num_envs, np.bool_)
        self._truncated = np.zeros(num_envs, np.bool_)

    def _connect(self) -> None:
        """Has every actor dial back to a port on this node; the connections, by group."""
        authkey = os.urandom(32)
        with socket.create_server(("", 0)) as server:
            server.settimeout(CONNECT_TIMEOUT_S)
            address = self._ray.util.get_node_ip_address(), server.getsockname()[1]
            self._serving = [a.serve.remote(address, authkey, w) for w, a in enumerate(self.actors)]
            conns: list = [None] * self.num_workers
            for _ in range(self.num_workers):
                try:
                    sock, _ = server.accept()
                except TimeoutError:
                    raise WorkerDied(f"an env group's Ray actor did not connect back to the trainer at "
                                     f"{address[0]}:{address[1]} within {CONNECT_TIMEOUT_S:.0f} s (is that port "
                                     f"reachable from the other nodes?)") from None
                conn = _connection(sock)
                mpc.deliver_challenge(conn, authkey)
                conns[conn.recv()] = conn
        self.conns = conns

    def _result(self, w: int, ref):
        """What actor w's Ray call returned; its env's error raised; its death a WorkerDied."""
        try:
            out = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            raise self._died(w, exc) from None
        if isinstance(out, EnvError):
            raise out
        return out

    def _died(self, w: int, exc: BaseException | None = None) -> WorkerDied:
        """The error for group w's actor, gone: with Ray's reason, if it says one in time."""
        if exc is None and self._serving:
            try:
                self._ray.get(self._serving[w], timeout=5)
            except Exception as reason:
                exc = reason
        node = f" on node {self.nodes[w][0]}" if self.nodes else ""
        text = str(exc).strip() if exc is not None else ""
        cause = next((line.strip() for line in text.splitlines() if line.strip()), "its connection closed")
        return WorkerDied(f"env group {w} (a Ray actor{node}) ended unexpectedly: {cause}")

    def _reply(self, w: int, buffer: bytearray):
        """Group w's next message: None for a raw step (now in `buffer`), else its pickled
        result (an env's error raised)."""
        try:
            message = receive(self.conns[w], buffer)
        except (EOFError, ConnectionError):
            raise self._died(w) from None
        if message is None:
            return None
        result, ok = message
        if not ok:
            raise result
        return result

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        G = self.group_size
        for conn, seeds in zip(self.conns, self._seeds_by_group(seed)):
            conn.send(("reset", (seeds, options)))
        infos = {}
        for w in range(self.num_workers):
            obs, pairs = self._reply(w, self._replies[w].buffer)
            self._obs[w * G:(w + 1) * G] = obs
            infos = merge_infos(self, pairs, infos, w * G)
        return self._obs, infos

    def step_wait(self, timeout: float | None = None):
        if not any(self._pending):
            raise gym.error.NoAsyncCallError("Calling `step_wait` without any prior call to `step_async`", "step")
        infos, G = {}, self.group_size
        for w in range(self.num_workers):
            if self._pending[w]:
                obs, rewards, terminated, truncated, pairs = self.recv_group(w)
                c = slice(w * G, (w + 1) * G)
                self._obs[c], self._rewards[c], self._terminated[c], self._truncated[c] = (
                    obs, rewards, terminated, truncated)
                infos = merge_infos(self, pairs, infos, w * G)
        return self._obs, self._rewards, self._terminated, self._truncated, infos

    @property
    def channels(self) -> list:
        return self.conns

    def _send_failed(self, w: int, exc: OSError) -> Exception:
        return self._died(w)

    def recv_group(self, w: int):
        """Group w's step: (obs [G, *obs], rewards, terminated, truncated, its (env-in-group,
        info) pairs), the arrays views into its reply, reused by the group's next step."""
        reply = self._replies[w]
        self._pending[w] = False
        result = self._reply(w, reply.buffer)
        pairs = ()
        if result is not None:  # pickled: a step with infos
            reply.obs[:], reply.rewards[:], reply.terminated[:], reply.truncated[:], pairs = result
        return reply.obs, reply.rewards, reply.terminated, reply.truncated, pairs

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Closes the envs (unless `terminate`: a forced stop, or a reply that may be half
        read), then ends the actors, and the local Ray instance if this env started it.
        An env's close() error is raised last."""
        failed = None
        try:
            if not terminate:
                failed = self._close_envs(timeout or CLOSE_TIMEOUT_S)
        finally:
            for conn in self.conns:
                conn.close()
            self.conns = []
            self._shut_down()
        if failed is not None:
            raise failed

    def _close_envs(self, timeout: float) -> EnvCloseError | None:
        failed = None
        for w, conn in enumerate(self.conns):
            try:
                if self._pending[w] and conn.poll(timeout):  # the step in flight first, whatever it says
                    try:
                        self.recv_group(w)
                    except EnvError:
                        pass  # the step's own error: not the close's, and the run is ending
                conn.send(("close", None))
                if conn.poll(timeout):
                    self._reply(w, self._replies[w].buffer)
            except EnvError as exc:
                failed = failed or EnvCloseError(str(exc), exc.trace, exc.error_type)
            except (WorkerDied, OSError, EOFError):
                continue  # already gone: nothing of it to close
        return failed

    def _shut_down(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False
