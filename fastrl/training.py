"""The training loops: one per algorithm, readable top to bottom.

Shared parts (collector, ring, learner pieces, Run bookkeeping) are imported.
"""
from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import time

import torch

from fastrl import accel, cluster, profile
from fastrl.algos import ddqn, reinforce
from fastrl.buffer import ReplayRing, RolloutBuffer
from fastrl.checkpoint import make_dir
from fastrl.collector import Collector
from fastrl.config import TrainConfig, choices, validate
from fastrl.envs import EnvSpec, close_envs, inspect_env, make_vector_env
from fastrl.errors import ConfigError, WorkerDied
from fastrl.nets import build_network
from fastrl.optim import Adam
from fastrl.run import Run
from fastrl.run.artifacts import RunDir, create_run_dir, describe_failure
from fastrl.run.logs import DeviceMeans
from fastrl.run.resume import resumed
from fastrl.schedules import learning_rate, linear_schedule
from fastrl.system import available_memory
from fastrl.timing import startup_s
from fastrl.video import check_can_record


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid device='cuda': no CUDA device is available here; use auto or cpu")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and torch.cuda._is_in_bad_fork():  # else "CUDA error: initialization error", deep in torch
        raise ConfigError(f"invalid device={name!r}: this process was forked from one that had already used CUDA, "
                          f"which CUDA does not allow; start training processes with the 'spawn' method "
                          f"(multiprocessing.get_context('spawn')) or pass device='cpu'")
    return device


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None) -> dict:
    """Trains per `config`; returns the run summary (also written to <run_dir>/summary.json).

    `resume`: a run directory whose run goes on from its state.pt (see fastrl.run.resume),
    with its own config, or `config` where it differs only in what a resumed run may change.

    Everything is validated before any work starts; invalid settings raise ConfigError.
    """
    started = time.perf_counter()  # time to solve counts from here, plus the process's start-up
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"fastrl.train() takes a TrainConfig (from fastrl.make_config(**settings)), "
                        f"not {type(config).__name__}")
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"fastrl.train(resume=...) takes a run directory's path, not {type(resume).__name__}")
    if config is None and resume is None:
        raise TypeError("fastrl.train() needs a TrainConfig (from fastrl.make_config(**settings)) or resume=RUN_DIR")
    state = None
    if resume is not None:
        config, state = resumed(resume, config)
    validate(config)
    if multiprocessing.current_process().daemon:
        raise ConfigError(f"fastrl.train() starts env worker and evaluation processes, which a daemonic process "
                          f"({multiprocessing.current_process().name}, e.g. a multiprocessing.Pool worker) may not "
                          f"start: run it in a concurrent.futures.ProcessPoolExecutor or a multiprocessing.Process")
    if config.backend == "ray":  # said before any work: a missing extra, a cluster that does not answer
        cluster.import_ray()
        cluster.check_reachable(config.ray_address)
    spec = inspect_env(config.env_id, config.env_kwargs)
    if config.algo == "reinforce" and spec.max_episode_steps is None:
        raise ConfigError(f"env {config.env_id!r} has no time limit, and REINFORCE needs episodes that end: "
                          f"pass --env-kwargs max_episode_steps=N")
    if config.video:
        check_can_record(config.env_id, spec.render_modes)
    device = resolve_device(config.device)
    chosen = choices(config, device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if config.learner == "auto":  # CUDA graphs replay a whole update in one launch (`fastrl bench learn`)
        config = dataclasses.replace(config, learner="cudagraphs" if device.type == "cuda" else "compile")
    if config.learner == "cudagraphs" and device.type != "cuda":
        raise ConfigError(f"invalid learner='cudagraphs': CUDA graphs need a CUDA device, and this run trains "
                          f"on {device.type}; use compile or eager")
    check_storage_fits(config, spec, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with accel.denormals_flushed():
            return _start_and_train(config, spec, device, started, state, chosen)
    finally:
        torch.set_num_threads(threads)  # the calling process (a notebook, a sweep) keeps its own setting


def replay_ring(c: TrainConfig, spec: EnvSpec, device: torch.device, groups: int = 1) -> ReplayRing:
    """DDQN's replay storage (one write head per group of envs)."""
    return ReplayRing(c.buffer_size, c.num_envs, spec.obs_shape, device, c.n_step, c.gamma, groups, c.per_alpha,
                      c.per_beta)


def rollout_buffer(c: TrainConfig, spec: EnvSpec, device: torch.device) -> RolloutBuffer:
    """REINFORCE's storage: room for the longest episode plus one rollout, since
    unfinished episodes wait in the ring. Each update learns from at most two rollouts'
    worth of steps: a rollout writes that many on average, and the margin absorbs the
    bursts of long episodes ending together."""
    return RolloutBuffer(c.rollout_steps + spec.max_episode_steps + 2, c.num_envs, spec.obs_shape, device,
                         batch_size=2 * c.rollout_steps * c.num_envs)


# Copies of the network's parameters a run keeps in memory: DDQN's weights, target, two
# Adam moments, gradients and the evaluation's copy; REINFORCE's have no target.
NETWORK_COPIES = {"ddqn": 6, "reinforce": 5}


def check_storage_fits(c: TrainConfig, spec: EnvSpec, device: torch.device) -> None:
    """Refuses, before any process starts, a run whose network or (on the CPU) ring would
    not fit in memory: its allocation would fail deep in torch, or the OOM killer would end
    the run. (On CUDA the GPU's free memory cannot be read before the env workers are
    forked: the host's memory bounds the network there, which the evaluation copies.)"""
    available = available_memory()
    if available is None:
        return
    meta = torch.device("meta")  # shapes only: nothing is allocated
    with meta:
        params = sum(p.numel() for p in build_network(c, spec.obs_shape, spec.n_actions).parameters())
    copies = NETWORK_COPIES[c.algo] if device.type == "cpu" else 2
    network = 4 * params * copies
    if network > 0.8 * available:
        raise ConfigError(f"invalid hidden={c.hidden}: a network of {params / 1e6:,.0f} M parameters takes "
                          f"{4 * params / 1e9:.1f} GB, and training keeps {copies} copies of it ({network / 1e9:.1f} "
                          f"GB), more than 80% of the {available / 1e9:.1f} GB of memory available: use smaller "
                          f"widths")
    if device.type != "cpu":
        return
    if c.algo == "ddqn":
        ring = replay_ring(c, spec, meta)
        name, what, fix = "buffer_size", f"{c.buffer_size:,} transitions", "lower buffer_size"
    else:
        ring = rollout_buffer(c, spec, meta)
        steps = f"{ring.rows:,} steps (rollout_steps + the env's time limit)"
        name, what, fix = "num_envs", f"{c.num_envs} envs x {steps}", "fewer num_envs"
    if ring.nbytes > 0.8 * available:
        raise ConfigError(f"invalid {name}={getattr(c, name)}: a ring of {what} of {spec.obs_shape} observations "
                          f"needs {ring.nbytes / 1e9:.1f} GB, and it may take at most 80% of the "
                          f"{available / 1e9:.1f} GB of memory available ({0.8 * available / 1e9:.1f} GB): {fix}")


def _start_and_train(config: TrainConfig, spec: EnvSpec, device: torch.device, started: float,
                     state: dict | None, chosen: dict) -> dict:
    """Starts the run's processes, runs the algorithm's loop and ends the run (see train());
    `chosen`: what its automatic settings became (config.json's "chosen")."""
    torch.manual_seed(config.seed)
    loop = {"ddqn": train_ddqn, "reinforce": train_reinforce}[config.algo]
    path = make_dir(config.run_dir, "run_dir") if state is not None else create_run_dir(config)
    run_dir = RunDir(path, config, spec, chosen)
    # Worker processes are forked before any CUDA state exists.
    envs = make_vector_env(config.env_id, config.num_envs, config.backend, config.env_kwargs, config.num_workers,
                           config.pin_workers, config.ray_address)
    try:
        run = Run(config, spec, device, run_dir, started, resumed=state)
    except BaseException:
        envs.close()
        raise
    with run.stop.installed():  # Ctrl-C, SIGTERM: the loop stops soon, never mid-step (see StopRequest)
        collector = Collector(envs, device, run.phases, ready_first=config.collection == "ready-first")
        try:
            with run.stop.forced_after_grace():  # a SIGTERM's stop that does not come in 5 s is forced
                loop(config, spec, collector, run)
        except KeyboardInterrupt:  # a second signal, or a stop that gave up waiting for an evaluation
            run.stop.requested = run.stop.forced = True  # the workers are ended at once, not waited for
        except Exception as exc:
            # Workers that died after a stop request got its signal too (SIGTERM to the
            # whole process group: systemd, Slurm): the stop, not a failure.
            if not (run.stop.requested and isinstance(exc, WorkerDied)):
                run.finish(error=describe_failure(exc))
                raise
        finally:
            close_envs(lambda: collector.close(terminate=run.stop.forced))
        return run.finish()


def ddqn_parts(c: TrainConfig, spec: EnvSpec, device: torch.device, groups: int
               ) -> tuple[ReplayRing, torch.nn.Module, torch.nn.Module, Adam]:
    """DDQN's replay ring, Q-network, target network and optimizer."""
    ring = replay_ring(c, spec, device, groups)
    q = build_network(c, spec.obs_shape, spec.n_actions).to(device)  # a QNetwork
    q_target = copy.deepcopy(q).requires_grad_(False)
    return ring, q, q_target, Adam(q, c.lr, c.max_grad_norm)


def first_compiled_update(c: TrainConfig, spec: EnvSpec, device: torch.device, groups: int) -> None:
    """One compiled DDQN update of the learner a run of `c` builds, on a throwaway ring
    holding one step of zeros: what fastrl.precompile runs to fill the kernel cache."""
    ring, q, q_target, optimizer = ddqn_parts(c, spec, device, groups)
    obs = torch.zeros((c.num_envs, *spec.obs_shape), device=device)
    zeros = torch.zeros(c.num_envs, device=device)
    ring.start(obs)
    width = c.num_envs // groups
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        ring.add(zeros[cols].long(), zeros[cols], zeros[cols].bool(), zeros[cols].bool(), obs[cols], group=g)
    ddqn.make_learn_step(ring.sampler(c.batch_size), q, q_target, optimizer, c.tau, c.target_update_interval,
                         "compile", priorities=ring.priorities)()


def store_step(collector: Collector, ring: ReplayRing, group: int, actions: torch.Tensor, run: Run) -> torch.Tensor:
    """Collects the step `group`'s envs are taking (waiting for it), writes it into the
    ring, counts it; returns their next observations [G, *obs], a view into `collector.obs`."""
    step = collector.receive(group)  # times "env" and "h2d"
    with run.phases("ring_write"):
        ring.add(actions, step.rewards, step.terminated, step.truncated, step.obs, group)
    run.env_steps += len(step.rewards)
    return step.obs


def train_ddqn(config: TrainConfig, spec: EnvSpec, collector: Collector, run: Run) -> None:
    c, device, phases = config, run.device, run.phases
    groups = collector.groups  # one group of all envs in lockstep, else one per env worker
    ring, q, q_target, optimizer = ddqn_parts(c, spec, device, len(groups))
    # Sampling, the update and the target-network update run as one compiled step (or
    # CUDA graph); profiling times their stages one by one instead. A first run on this
    # machine updates eagerly while another process compiles the step (fastrl.precompile).
    learner = (ring.sampler(c.batch_size), q, q_target, optimizer, c.tau, c.target_update_interval, c.learner)
    learn = (profile.timed_learn_step(*learner, phases, ring.priorities) if c.profile
             else ddqn.make_learn_step(*learner, switch=run.precompile(len(groups), ring.nbytes),
                                       priorities=ring.priorities))
    act = ddqn.make_act(q)
    run.watch(q, ring)
    learner_stats = DeviceMeans(("losses/td_loss", "losses/q_mean", "losses/grad_norm"), device)
    update_credit = 0.0

    def state() -> dict:  # what a resumed run goes on from (with the run's own, see Run.save_state)
        return {"q": q.state_dict(), "q_target": q_target.state_dict(), "optimizer": optimizer.state_dict(),
                "ring": ring.state_dict(), "update_credit": update_credit}

    obs = collector.reset(seed=run.reset_seed)  # [N, *obs]: each group's rows change when its step arrives
    saved = run.restore(collector)
    if saved is None:
        ring.start(obs)
    else:
        q.load_state_dict(saved["q"])
        q_target.load_state_dict(saved["q_target"])
        optimizer.load_state_dict(saved["optimizer"])
        ring.load_state_dict(saved["ring"])
        ring.cut(obs)  # the episodes in progress ended as truncations; new ones start
        update_credit = saved["update_credit"]
    eps_now = linear_schedule(run.env_steps, c.eps_start, c.eps_end, c.eps_decay_steps)
    eps = torch.tensor(eps_now, device=device)
    lr_now = learning_rate(c, run.env_steps)
    actions: list = [None] * len(groups)  # each group's actions in flight
    ready = range(len(groups))  # the groups whose step has arrived: at first, all
    while run.budget_left():
        # One forward pass for all envs, however many groups are ready: the actions of
        # groups still stepping are discarded.
        with phases("act"):
            chosen = act(obs, eps)
        for g in ready:
            actions[g] = chosen[groups[g]]
            collector.send(g, actions[g])

        # Learn while the env workers step (async backends). A stop request skips the rest:
        # with a large replay_ratio x num_envs one cycle's updates can take seconds.
        if run.env_steps >= c.learning_starts and ring.size > 0:
            update_credit += sum(len(actions[g]) for g in ready) * c.replay_ratio
            while update_credit >= 1.0 and not run.stop.requested:
                with phases("update"):
                    learner_stats.add(learn())
                run.updates += 1
                update_credit -= 1.0

        ready = collector.ready()  # in lockstep, the one group
        for g in ready:
            store_step(collector, ring, g, actions[g], run)
        eps_now = linear_schedule(run.env_steps, c.eps_start, c.eps_end, c.eps_decay_steps)
        eps.fill_(eps_now)
        lr_now = learning_rate(c, run.env_steps)
        optimizer.lr.fill_(lr_now)
        if ring.priorities is not None:
            ring.priorities.beta.fill_(linear_schedule(run.env_steps, c.per_beta, 1.0, c.total_steps))

        if run.end_cycle(collector, learner_stats, {"charts/epsilon": eps_now, "charts/lr": lr_now}, state):
            break  # solved
    run.end_loop(collector, learner_stats, {"charts/epsilon": eps_now, "charts/lr": lr_now}, state)


def train_reinforce(config: TrainConfig, spec: EnvSpec, collector: Collector, run: Run) -> None:
    c, device, phases = config, run.device, run.phases
    buffer = rollout_buffer(c, spec, device)
    policy = build_network(c, spec.obs_shape, spec.n_actions).to(device)  # a PolicyNetwork
    optimizer = Adam(policy, c.lr, c.max_grad_norm)
    running_mean = torch.zeros((), device=device)
    learner = (policy, optimizer, c.baseline, c.normalize_returns, c.entropy_coef, c.value_coef, running_mean,
               c.importance_clip, c.learner)
    update = profile.timed_update(*learner, phases) if c.profile else reinforce.make_update(*learner)
    act = reinforce.make_act(policy)
    run.watch(policy, buffer)
    learner_stats = DeviceMeans(("losses/loss", "losses/policy_loss", "losses/value_loss",
                                 "losses/entropy", "losses/grad_norm", "charts/steps_lost_per_update"), device)
    episodes_learned = 0

    def state() -> dict:  # what a resumed run goes on from (with the run's own, see Run.save_state)
        return {"policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "buffer": buffer.state_dict(),
                "running_mean": running_mean.cpu(), "episodes_learned": episodes_learned}

    obs = collector.reset(seed=run.reset_seed)
    saved = run.restore(collector)
    if saved is None:
        buffer.start(obs)
    else:
        policy.load_state_dict(saved["policy"])
        optimizer.load_state_dict(saved["optimizer"])
        buffer.load_state_dict(saved["buffer"])
        buffer.cut(obs)  # the episodes in progress are dropped; new ones start
        running_mean.copy_(saved["running_mean"])
        episodes_learned = saved["episodes_learned"]
    lr_now = learning_rate(c, run.env_steps)
    while run.budget_left():
        for _ in range(c.rollout_steps):
            if run.stop.requested:  # a long rollout ends early
                break
            with phases("act"):
                actions, log_probs = act(obs)
            collector.step_async(actions)
            buffer.record_log_probs(log_probs)
            obs = store_step(collector, buffer, 0, actions, run)

        # Learn once from every episode that ended since the last update (host-side count);
        # a stop request skips what is left of it.
        if collector.episodes > episodes_learned and not run.stop.requested:
            with phases("targets"):
                batch = buffer.episodes(c.gamma)
            for _ in range(c.grad_steps):
                if run.stop.requested:
                    break
                with phases("update"):
                    learner_stats.add((*update(batch), buffer.take_lost()))
                run.updates += 1
            with phases("ring_write"):
                buffer.mark_learned(batch)
            episodes_learned = collector.episodes
        lr_now = learning_rate(c, run.env_steps)
        optimizer.lr.fill_(lr_now)

        if run.end_cycle(collector, learner_stats, {"charts/lr": lr_now}, state):
            break  # solved
    run.end_loop(collector, learner_stats, {"charts/lr": lr_now}, state)


# Time to solve counts the start-up a fresh process pays (the interpreter, torch,
# gymnasium): measured once, now that this module's imports are done.
startup_s()
