"""Vectorized greedy evaluation on env seeds disjoint from training, in this process
(`Evaluator`) or in a process of its own while training goes on (`BackgroundEvaluator`)."""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import time
import traceback
from typing import Callable, NamedTuple

import numpy as np
import torch

from fastrl import checkpoint
from fastrl.config import SEED_LIMIT, TrainConfig, check, plain_value
from fastrl.envs import EnvSpec, close_envs, inspect_env, make_vector_env
from fastrl.envs.process import end_processes, init_worker, worker_died
from fastrl.errors import ConfigError, EnvError, WorkerDied
from fastrl.interrupts import ctrl_c_held
from fastrl.nets import build_network, greedy_policy
from fastrl.progress import Progress

# Training envs are seeded seed + i (i < num_envs); evaluation starts far above.
EVAL_SEED_OFFSET = 3_000_000_019


def evaluation_seed(seed: int, index: int) -> int:
    """The env seed of evaluation number `index` of a training run with `seed`: each
    evaluation starts from seeds of its own, so a resumed run evaluates as the
    uninterrupted run would have."""
    return EVAL_SEED_OFFSET + seed + 1_000_003 * index


class EvalResult(NamedTuple):
    mean: float
    std: float
    episodes: int
    returns: list


class Evaluator:
    """Runs `episodes` greedy episodes over `num_envs` in-process envs.

    Every env plays a fixed quota of episodes (quotas differ by at most one), so
    short episodes are not over-represented the way "first N to finish" would be.
    An env that has played its quota is not stepped again: an evaluation costs the
    steps of its episodes, not those of its longest env's.
    """

    def __init__(self, env_id: str, env_kwargs: dict, num_envs: int, seed: int, device: torch.device):
        self.envs = make_vector_env(env_id, num_envs, "sync", env_kwargs)
        self.num_envs = num_envs
        self.device = device
        self._next_seed: int | None = EVAL_SEED_OFFSET + seed

    @torch.no_grad()
    def run(self, policy: Callable[[torch.Tensor], torch.Tensor], episodes: int,
            screen_below: float = math.nan, on_episodes: Callable[[int, int], None] | None = None,
            seed: int | None = None) -> EvalResult:
        """policy: obs [E, *obs] -> actions [E]. With `screen_below`, stop after the first
        round (one episode per env) if its mean is already below that value: a cheap
        screen before paying for the full evaluation. `on_episodes(episodes, env_steps)`
        is called, if given, after each step that ended an episode (for a progress line).
        `seed` reseeds the envs (else the first run uses the evaluator's seed and later
        runs continue its envs' random streams)."""
        E = self.num_envs
        env_steps = 0
        quota = np.full(E, episodes // E) + (np.arange(E) < episodes % E)
        returns: list[list[float]] = [[] for _ in range(E)]
        played = np.zeros(E, dtype=np.int64)  # episodes each env has played
        obs, _ = self.envs.reset(seed=seed if seed is not None else self._next_seed)  # an env's error: EnvError
        self._next_seed = None  # later evaluations continue the seeded RNG streams
        ep_return = np.zeros(E)
        prev_done = np.zeros(E, dtype=bool)  # per env: its next step is the autoreset's
        screening = not math.isnan(screen_below) and episodes > E
        # While screening, an env waits after its first episode: if the screen fails, the
        # steps of its second are not paid for.
        active = played < (1 if screening else quota)
        while active.any():
            obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
            actions = policy(obs_t).cpu().numpy()  # every row: a batch of one shape, whoever steps
            obs, reward, terminated, truncated, _ = self.envs.step(actions, active)
            ep_return += reward * (active & ~prev_done)
            done = (terminated | truncated) & active
            for i in np.flatnonzero(done):
                returns[i].append(float(ep_return[i]))
                ep_return[i] = 0.0
            played += done
            prev_done = np.where(active, done, prev_done)
            env_steps += int(active.sum())
            if on_episodes is not None and done.any():
                on_episodes(int(played.sum()), env_steps)
            if screening and played.min() >= 1:
                screening = False
                first = [r[0] for r in returns]  # one episode per env: an unbiased sample
                if np.mean(first) < screen_below:
                    break
            active = played < (1 if screening else quota)
        flat = [x for r in returns for x in r]
        bad = [x for x in flat if not math.isfinite(x)]
        if bad:  # a mean of them would mean nothing (and an inf one would "solve")
            raise EnvError(f"an env gave a non-finite reward: an evaluation episode returned {bad[0]}; "
                           f"rewards must be finite numbers")
        return EvalResult(float(np.mean(flat)), float(np.std(flat)), len(flat), flat)

    def close(self) -> None:
        self.envs.close()


class BackgroundEvaluator:
    """Greedy evaluations in a process of their own, so that training goes on meanwhile
    (on a machine whose env workers leave a core mostly idle, evaluation is then free).

    The process is started with the env workers, before any compilation or CUDA state,
    and owns an `Evaluator` on the CPU. `submit()` sends host copies of the weights and
    returns at once; `result()` waits for that evaluation. One evaluation is in flight at
    a time, so they run in order, each on exactly the weights it was given: the same
    results as `Evaluator.run` in the trainer.
    """

    def __init__(self, config: TrainConfig, spec: EnvSpec):
        context = multiprocessing.get_context()  # the env workers' (fork on Linux)
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_evaluation_worker, args=(child, config, spec), daemon=True,
                                        name="fastrl-eval")
        with ctrl_c_held():  # a fork: see ctrl_c_held
            self._process.start()
        child.close()
        self.in_flight = False

    def submit(self, weights: dict[str, torch.Tensor], episodes: int, screen_below: float = math.nan,
               seed: int | None = None) -> None:
        """Starts evaluating a network with these weights (a state dict, copied as it is sent:
        training may change it at once), its envs reseeded with `seed` if given."""
        assert not self.in_flight, "one evaluation at a time: collect result() first"
        try:
            self._conn.send(({k: v.cpu().numpy() for k, v in weights.items()}, episodes, screen_below, seed))
        except OSError:
            raise self._died() from None
        self.in_flight = True

    def ready(self) -> bool:
        """True when the evaluation in flight has finished (result() will not wait)."""
        return self.in_flight and self._conn.poll()

    def result(self, give_up: Callable[[], bool] = lambda: False) -> EvalResult:
        """Waits for the evaluation in flight. If `give_up()` turns true meanwhile (checked
        every 0.1 s), raises KeyboardInterrupt and leaves the evaluation to close()."""
        while not self._conn.poll(0.1):  # a dead process reads as ready: recv() then fails
            if give_up():
                raise KeyboardInterrupt  # still in flight: close() ends it
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        finally:
            self.in_flight = False
        if isinstance(reply, EnvError):
            raise type(reply)(f"{reply} (in the evaluation process)", reply.trace, reply.error_type)
        if isinstance(reply, str):
            raise RuntimeError(f"evaluation failed in its process:\n{reply}")
        return reply

    def _died(self) -> WorkerDied:
        return worker_died("the evaluation process", [self._process])

    def close(self, terminate: bool = False) -> None:
        """Stops the process; an evaluation in flight is abandoned. With `terminate` (a
        forced stop) or an evaluation in flight, the process is given 1 s to end after
        SIGTERM, else 5 s to close its envs; then it is killed (see end_processes)."""
        terminate = terminate or self.in_flight
        if self._process.is_alive() and not terminate:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        end_processes([self._process], terminate, 1.0 if terminate else 5.0)
        self._conn.close()
        self.in_flight = False


def _evaluation_worker(conn, config: TrainConfig, spec: EnvSpec) -> None:
    init_worker()
    torch.set_num_threads(1)
    model = build_network(config, spec.obs_shape, spec.n_actions).eval()
    greedy = greedy_policy(model)
    evaluator = None  # its envs are made for the first evaluation: an env that cannot be made is its error
    try:
        while (request := conn.recv()) is not None:
            weights, episodes, screen_below, seed = request
            try:
                evaluator = evaluator or Evaluator(config.env_id, config.env_kwargs, config.eval_envs, config.seed,
                                                   torch.device("cpu"))
                model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
                conn.send(evaluator.run(greedy, episodes, screen_below, seed=seed))
            except EnvError as exc:  # strings only: it pickles, whatever the env raised
                conn.send(exc)
            except Exception:
                conn.send(traceback.format_exc(limit=4))
    except (EOFError, OSError):  # the trainer is gone
        pass
    finally:
        if evaluator is not None:
            close_envs(evaluator.close, where="the evaluation process")


def _check_display() -> None:
    # With no display, SDL (pygame, which gymnasium's envs draw with) falls back to an
    # off-screen driver: the episodes would play at the frame rate, unseen.
    headless = sys.platform.startswith("linux") and not any(
        os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"))
    if headless:
        raise ConfigError("render needs a display, and this session has none (DISPLAY and WAYLAND_DISPLAY "
                          "are unset): run it on a desktop, or over ssh -X")


def load_policy(path: str, device: torch.device | str = "cpu"):
    """Rebuilds a trained network from a checkpoint (or a run directory holding one).
    Returns (config, model, greedy_fn)."""
    payload = checkpoint.load(path)
    try:
        config = TrainConfig.from_dict(payload["config"])
    except (ConfigError, TypeError) as exc:
        raise ValueError(f"checkpoint {str(path)!r} holds a config that is not valid: {exc}") from None
    meta = payload["meta"]
    model = build_network(config, tuple(meta["obs_shape"]), int(meta["n_actions"]))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights: torch's many-line message
        detail = "; ".join(line.strip() for line in str(exc).strip().splitlines()[1:])
        raise ValueError(f"checkpoint {str(path)!r} holds weights that do not fit the network its config "
                         f"describes ({detail[:300]})") from None
    model.to(device).eval()
    return config, model, greedy_policy(model)


def evaluate_checkpoint(path: str, episodes: int | None = None, seed: int = 0, device: torch.device | str = "cpu",
                        num_envs: int = 20, progress: bool = False, render: bool = False) -> EvalResult:
    """Greedy evaluation of a saved policy on env seeds disjoint from training: `episodes`
    (default 100) over `num_envs` envs. With `render`, the episodes play one after another
    in a window, at the env's frame rate (its render_mode 'human'; default 3 episodes).
    With `progress`, a live line on stderr when it is a terminal (never in a log or a pipe)."""
    episodes = plain_value("episodes", "int", episodes if episodes is not None else 3 if render else 100)
    num_envs = plain_value("num_envs", "int", num_envs)
    seed = plain_value("seed", "int", seed)
    check(episodes >= 1, "episodes", episodes, "a positive integer")
    check(num_envs >= 1, "num_envs", num_envs, "a positive integer")
    # As in training: the env seeds, past the offset, stay disjoint from training's.
    check(0 <= seed < SEED_LIMIT, "seed", seed, "an integer in [0, 2**31)")
    device = torch.device(device)
    config, _, greedy = load_policy(path, device)
    # A plain evaluation never draws: a run trained before render_mode='human' was refused
    # in training still holds it in its env_kwargs.
    env_kwargs = {k: v for k, v in config.env_kwargs.items() if k != "render_mode"}
    spec = inspect_env(config.env_id, env_kwargs)  # still registered, and as trained: else one line
    if render:
        if "human" not in spec.render_modes:
            raise ConfigError(f"{config.env_id} cannot draw to a window (its render modes: "
                              f"{', '.join(spec.render_modes) or 'none'}), so it cannot be watched with render")
        _check_display()
        env_kwargs, num_envs = {**env_kwargs, "render_mode": "human"}, 1
    evaluator = Evaluator(config.env_id, env_kwargs, min(num_envs, episodes), seed, device)
    line = Progress(episodes, enabled=progress and sys.stderr.isatty(), stream=sys.stderr)
    start = drawn = time.perf_counter()

    def show(done: int, env_steps: int) -> None:
        nonlocal drawn
        now = time.perf_counter()
        if now - drawn >= 0.25 or done == episodes:  # a few redraws a second
            drawn, elapsed = now, now - start
            line.show(done, "episodes", f"{env_steps / elapsed:8,.0f} env steps/s", elapsed, done / elapsed)

    try:
        return evaluator.run(greedy, episodes, on_episodes=show if line.enabled else None)
    finally:
        line.close()
        close_envs(evaluator.close)
