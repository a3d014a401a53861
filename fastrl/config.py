"""Typed training configuration, per-env presets and validation.

`TrainConfig` holds every knob with a one-line doc (the CLI's --help is generated
from it). `make_config()` layers: dataclass defaults < preset for (algo, env) <
the caller's values, then validates. Validation errors are `ConfigError`s whose
one-line message quotes the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from fastrl.errors import ConfigError
from fastrl.system import cpu_capacity, cpu_cores, default_workers, thread_limit

ALGOS = ("ddqn", "reinforce")
BASELINES = ("none", "mean", "value")
BACKENDS = ("async", "sync", "envpool", "ray")
COLLECTIONS = ("lockstep", "ready-first")
SEED_LIMIT = 2**31  # seeds (training and evaluation) are in [0, SEED_LIMIT)
LEARNER_MODES = ("eager", "compile", "cudagraphs")
LEARNERS = ("auto", *LEARNER_MODES)
DEVICES = ("auto", "cpu", "cuda")


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field carrying its one-line doc (shown by --help)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class TrainConfig:
    # --- run ---------------------------------------------------------------------------
    env_id: str = _f("LunarLander-v3", "gymnasium env id (Box observations, Discrete actions)", cli="env")
    env_kwargs: dict = _f({}, "keyword arguments for gymnasium.make, e.g. enable_wind=true wind_power=15")
    algo: str = _f("ddqn", "algorithm: ddqn | reinforce")
    seed: int = _f(0, "seed for torch, the env workers and sampling (eval uses disjoint env seeds)")
    device: str = _f("auto", "training device for the ring and the learner: auto | cpu | cuda")
    threads: int = _f(1, "torch intra-op CPU threads (small nets run fastest on 1; env workers use the rest)")
    learner: str = _f("auto", "learner update: auto (cudagraphs on CUDA, else compile) | eager | compile "
                              "(torch.compile; eager where it cannot) | cudagraphs (compile, then replay a CUDA "
                              "graph; CUDA only)")
    total_steps: int = _f(1_000_000, "env-step budget (all envs together)")
    time_limit_s: float = _f(0.0, "wall-clock budget in seconds for the training loop (0 = none)")
    run_dir: str = _f("", "run directory (default runs/<env>__<algo>__<seed>__<time>)")

    # --- collector ---------------------------------------------------------------------
    num_envs: int = _f(8, "parallel environments")
    backend: str = _f("async", "vector env backend: async (worker processes) | sync (in-process) | "
                               "envpool (C++ envs, optional extra) | ray (env groups as Ray actors on a cluster's "
                               "nodes, optional extra)")
    num_workers: int = _f(0, "[async, ray] env worker processes (Ray actors), each stepping num_envs / num_workers "
                             "envs (0 = one per CPU core but the trainer's; num_envs = one process per env)")
    ray_address: str = _f("", "[ray] the Ray cluster for the env groups: HOST:PORT of its head, auto, or "
                              "ray://HOST:PORT (empty = RAY_ADDRESS, else a local Ray instance for this run)")
    collection: str = _f("lockstep", "[async, ray, ddqn] lockstep: act once every env has stepped | ready-first: "
                                     "act on each worker's envs as soon as they have stepped (faster collection "
                                     "with large groups, no slower worker to wait for; the order then depends on "
                                     "timing, so runs do not repeat exactly); ray with several groups defaults to "
                                     "ready-first")
    pin_workers: bool = _f(True, "[async] pin each env worker process to its own CPU core "
                                 "(turn off when several runs share the machine)")

    # --- network and optimiser -----------------------------------------------------------
    hidden: tuple = _f((256, 256), "hidden layer widths of the MLP")
    lr: float = _f(5e-4, "Adam learning rate")
    lr_end: float = _f(math.nan, "learning rate reached linearly at total_steps (nan = constant lr)")
    gamma: float = _f(0.99, "discount factor, in (0, 1]")
    max_grad_norm: float = _f(10.0, "gradient-norm clip (0 disables)")

    # --- Double DQN ----------------------------------------------------------------------
    buffer_size: int = _f(100_000, "[ddqn] replay capacity in transitions")
    batch_size: int = _f(128, "[ddqn] minibatch size")
    n_step: int = _f(3, "[ddqn] n-step return length (1 = one-step TD)")
    learning_starts: int = _f(10_000, "[ddqn] env steps collected before the first update")
    replay_ratio: float = _f(0.25, "[ddqn] gradient updates per env step")
    target_update_interval: int = _f(1, "[ddqn] updates between target-network updates")
    tau: float = _f(0.005, "[ddqn] target update rate (1.0 = hard copy, <1 = Polyak)")
    eps_start: float = _f(1.0, "[ddqn] initial exploration epsilon")
    eps_end: float = _f(0.05, "[ddqn] final exploration epsilon")
    eps_decay_steps: int = _f(100_000, "[ddqn] env steps of the linear epsilon decay")
    dueling: bool = _f(False, "[ddqn] dueling Q-network head")
    per_alpha: float = _f(0.0, "[ddqn] prioritised replay: sample in proportion to |TD error| ** this "
                               "(0 = uniform; 0.6 is the paper's)")
    per_beta: float = _f(0.4, "[ddqn] prioritised replay's importance-sampling exponent at the start, "
                              "annealed linearly to 1 at total_steps")

    # --- REINFORCE -----------------------------------------------------------------------
    rollout_steps: int = _f(128, "[reinforce] vector steps between updates (running episodes carry over)")
    grad_steps: int = _f(1, "[reinforce] gradient steps on each batch of finished episodes")
    normalize_returns: bool = _f(True, "[reinforce] standardize the returns of each batch")
    baseline: str = _f("value", "[reinforce] baseline: none | mean (running mean) | value (learned head)")
    entropy_coef: float = _f(0.01, "[reinforce] entropy bonus coefficient")
    value_coef: float = _f(0.5, "[reinforce] value-head loss coefficient (baseline=value)")
    importance_clip: float = _f(0.0, "[reinforce] weigh steps an older policy acted by min(pi/mu, this); 0: no weights")

    # --- evaluation and logging ----------------------------------------------------------
    eval_interval: int = _f(25_000, "env steps between greedy evaluations (0 = only at the end)")
    eval_episodes: int = _f(100, "episodes per evaluation")
    eval_envs: int = _f(20, "vectorized envs used by evaluation")
    stop_on_solve: bool = _f(True, "stop once the greedy eval mean reaches the solve threshold")
    solve_threshold: float = _f(math.nan, "eval mean that counts as solved (nan = the env's reward_threshold)")
    checkpoint_interval: str = _f("30s", "how often the training state is saved for --resume: Ns (seconds), "
                                         "Nmin or Nsteps (env steps), e.g. 30s, 5min, 100000steps "
                                         "(0 = only when the run stops or ends)")
    video: bool = _f(False, "record one greedy episode of the final weights to video.mp4 in the run dir "
                            "(needs the video extra)")
    log_interval: float = _f(2.0, "seconds between TensorBoard flushes / progress updates")
    progress: bool = _f(True, "show the live progress line (eval results and the final summary print either way)")
    timers: bool = _f(True, "time the training phases (TensorBoard time/*); off = no timer calls at all")

    # --- profiling (set by `fastrl profile`) ---------------------------------------------
    profile: bool = _f(False, "profiling session: phase timers synchronised with the device", cli=None)
    profile_steps: int = _f(20_000, "env steps timed by a profiling session, after warm-up", cli="steps",
                            scope="profile")
    trace_cycles: int = _f(5, "collection cycles recorded in the torch.profiler trace", scope="profile")

    def __post_init__(self) -> None:
        # Plain Python values of each field's type, however the caller built them (numpy
        # scalars from a sweep, total_steps=1e6, a pathlib run_dir): the config goes to JSON
        # with every run.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, plain_value(f.name, f.type, getattr(self, f.name)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def invalid(name: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error that quotes `name`=`value` and what is allowed."""
    return ConfigError(f"invalid {name}={value!r}: must be {allowed}")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise invalid(name, value, allowed)


def plain_value(name: str, kind: str, value: Any) -> Any:
    """`value` as a plain Python `kind` (int, float, tuple of ints, bool, str, dict: a config
    field's annotation); a ConfigError naming `name` if it is not one."""
    def integral(v: Any) -> bool:
        return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and float(v).is_integer())

    if kind == "int" and integral(value):
        return int(value)
    if kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind == "tuple" and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        widths = tuple(value)
        if all(integral(w) for w in widths):
            return tuple(int(w) for w in widths)
    if kind == "str" and isinstance(value, os.PathLike):  # run_dir=pathlib.Path(...)
        return os.fspath(value)
    if kind in ("bool", "str", "dict") and isinstance(value, {"bool": bool, "str": str, "dict": dict}[kind]):
        return value
    allowed = {"int": "an integer", "float": "a number", "tuple": "a sequence of integers", "bool": "True or False",
               "str": "a string", "dict": "a dict of keyword arguments"}[kind]
    raise invalid(name, value, allowed)


# Tuned per (algo, env). Only what differs from the dataclass defaults.
# REINFORCE presets step envs in-process: an on-policy rollout has no learning to
# overlap with the env step, so worker processes would only add pipe round-trips.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # benchmarks/tune.py's best on its tuning seeds; benchmarks/LOG.md has its confirmation.
    ("ddqn", "LunarLander-v3"): dict(
        num_envs=16, hidden=(128, 128), lr=2.79e-3, lr_end=5e-5, batch_size=256, buffer_size=100_000,
        n_step=1, learning_starts=1_000, replay_ratio=0.0969, tau=0.0074, target_update_interval=1,
        eps_decay_steps=55_000, eps_end=0.073, total_steps=500_000, eval_interval=20_000,
    ),
    ("reinforce", "CartPole-v1"): dict(
        num_envs=8, backend="sync", hidden=(64, 64), lr=1e-2, rollout_steps=64, baseline="value",
        normalize_returns=True, entropy_coef=0.0, total_steps=300_000, eval_interval=10_000,
    ),
    # Many envs, short rollouts (many updates), importance weights for the long episodes an
    # older policy acted, an lr that decays (benchmarks/LOG.md, "REINFORCE with many envs").
    ("reinforce", "LunarLander-v3"): dict(
        num_envs=64, backend="sync", hidden=(128, 128), lr=2e-3, lr_end=1e-4, rollout_steps=8, baseline="value",
        normalize_returns=True, entropy_coef=0.01, importance_clip=1.0, total_steps=4_000_000,
        eval_interval=100_000,
    ),
    ("ddqn", "CartPole-v1"): dict(
        num_envs=4, hidden=(128, 128), lr=1e-3, batch_size=64, buffer_size=20_000, n_step=3,
        learning_starts=1_000, replay_ratio=0.5, tau=0.01, target_update_interval=1,
        eps_decay_steps=10_000, eps_end=0.02, total_steps=100_000, eval_interval=5_000,
    ),
}


# Presets for a variant of an env, named by one of its env_kwargs: laid over the env's
# preset when that keyword is set (true). benchmarks/LOG.md has how each was found.
VARIANTS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    # Wind and turbulence: twice the calm preset's updates per env step, a target network
    # that follows at under half the calm rate, a longer budget, and evaluations as often
    # as calm, since the greedy policy swings about the threshold (benchmarks/LOG.md,
    # "windy LunarLander").
    ("ddqn", "LunarLander-v3"): {"enable_wind": dict(replay_ratio=0.1938, tau=0.003, total_steps=1_000_000,
                                                     eval_interval=20_000)},
}


def preset_for(algo: str, env_id: str, env_kwargs: dict) -> tuple[str | None, dict[str, Any]]:
    """The preset of (algo, env), with any variant its env_kwargs name: (its name, its
    settings); (None, {}) where there is none."""
    if (algo, env_id) not in PRESETS:
        return None, {}
    name, values = f"{algo} on {env_id}", dict(PRESETS[(algo, env_id)])
    for keyword, settings in VARIANTS.get((algo, env_id), {}).items():
        if env_kwargs.get(keyword):
            name, values = f"{name}, {keyword}", {**values, **settings}
    return name, values


def checkpoint_every(text: str) -> tuple[str, float] | None:
    """`checkpoint_interval` as ("seconds" or "steps", amount), or None for 0 (only at the
    end); a ConfigError naming the value otherwise."""
    units = {"s": ("seconds", 1.0), "min": ("seconds", 60.0), "steps": ("steps", 1.0)}
    text = str(text).strip()
    if text in ("0", "0s", "0min", "0steps"):
        return None
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(number):].strip()
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if unit not in units or not 0 < amount < math.inf:
        raise invalid("checkpoint_interval", text, "a positive number with a unit: Ns, Nmin or Nsteps "
                                                    "(e.g. 30s, 5min, 100000steps), or 0")
    kind, scale = units[unit]
    return kind, amount * scale


def field_docs() -> dict[str, str]:
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(TrainConfig)}


def replay_ratio_for(num_envs: int, preset: dict[str, Any]) -> float:
    """The replay ratio of a DDQN preset (tuned at its own num_envs) at `num_envs` envs.
    N envs act N env steps on each policy between learning phases, so the data go stale
    faster as N grows: more envs get more updates per env step, the preset's ratio times
    (num_envs / the preset's num_envs) ** (1/3), and never fewer (benchmarks/LOG.md, "env
    steps to solve against the number of envs")."""
    return preset["replay_ratio"] * max(1.0, num_envs / preset["num_envs"]) ** (1 / 3)


def make_config(**overrides: Any) -> TrainConfig:
    """Dataclass defaults, then the (algo, env) preset, then `overrides`; validated. A
    DDQN preset's replay ratio follows a num_envs the caller sets (`replay_ratio_for`)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    base = TrainConfig()
    algo = overrides.get("algo", base.algo)
    env_id = overrides.get("env_id", base.env_id)
    env_kwargs = overrides.get("env_kwargs") or {}
    preset = preset_for(algo, env_id, env_kwargs if isinstance(env_kwargs, dict) else {})[1]
    values = {**preset, **overrides}
    if values.get("backend") == "ray" and "collection" not in overrides and values.get("algo", base.algo) == "ddqn":
        # Remote groups: act on each as it arrives, so no group waits for the slowest round trip.
        workers = values.get("num_workers") or default_workers(values.get("num_envs", base.num_envs))
        values["collection"] = "ready-first" if workers > 1 else "lockstep"
    config = dataclasses.replace(base, **values)  # num_envs a plain int from here on
    if "replay_ratio" in preset and "num_envs" in overrides and "replay_ratio" not in overrides:
        config = dataclasses.replace(config, replay_ratio=replay_ratio_for(config.num_envs, preset))
    validate(config)
    return config


def choices(c: TrainConfig, device: str, cuda_name: str | None = None) -> dict:
    """What this run's automatic settings became on this machine, and the rule behind each:
    written to config.json as "chosen", beside the settings. `c` as given (learner may be
    auto); `device`: the device it trains on; `cuda_name`: the GPU's name, if any. Every
    choice is a setting the caller may pass instead."""
    name, preset = preset_for(c.algo, c.env_id, c.env_kwargs)
    kept = sorted(k for k, v in preset.items() if getattr(c, k) == v)
    chosen = {
        "machine": {"cpu_cores": cpu_capacity(), "gpu": cuda_name},
        "preset": ({"for": name, "settings_kept": kept,
                    "why": "tuned for this algorithm and env (benchmarks/LOG.md has how)"} if name else
                   {"for": None, "why": f"no preset for {c.algo} on {c.env_id}: the defaults"}),
        "device": {"value": device, "why": "auto: cuda where a CUDA device is available, else cpu"
                   if c.device == "auto" else "set"},
        "learner": {"value": c.learner if c.learner != "auto" else ("cudagraphs" if device == "cuda" else "compile"),
                    "why": "auto: cudagraphs on CUDA (one launch per update), else compile" if c.learner == "auto"
                    else "set"},
    }
    if "replay_ratio" in preset:
        ratio, envs = preset["replay_ratio"], preset["num_envs"]
        chosen["replay_ratio"] = {"value": c.replay_ratio, "why": (
            f"the preset's {ratio} (tuned at {envs} envs) times (num_envs / {envs}) ** (1/3): more envs, "
            f"more updates per env step" if c.num_envs > envs and c.replay_ratio == replay_ratio_for(c.num_envs, preset)
            else "the preset's" if c.replay_ratio == ratio else "set")}
    if c.backend in ("async", "ray"):
        cores = max(1, cpu_cores() - 1)
        chosen["num_workers"] = {"value": c.num_workers or default_workers(c.num_envs), "why": "set" if c.num_workers
                                 else f"0: the largest divisor of num_envs ({c.num_envs}) not above the cores left "
                                      f"once the trainer has one ({cores})"}
    return chosen


def busy_cores(c: TrainConfig) -> int:
    """The cores a run keeps busy on this machine: its torch threads and its env worker
    processes (or EnvPool's threads). The sync backend steps its envs in the trainer, and
    Ray's env actors ask Ray for CPUs of their own."""
    workers = {"async": c.num_workers or default_workers(c.num_envs),
               "envpool": min(c.num_envs, cpu_cores())}.get(c.backend, 0)
    return c.threads + workers


def validate(c: TrainConfig) -> None:
    """Checks every value that does not need the env; raises ConfigError (one line)."""

    def need(ok: bool, name: str, allowed: str) -> None:
        check(ok, name, getattr(c, name), allowed)

    need(c.algo in ALGOS, "algo", " or ".join(ALGOS))
    need(c.backend in BACKENDS, "backend", " or ".join(BACKENDS))
    need(c.device in DEVICES, "device", " or ".join(DEVICES))
    need(c.collection in COLLECTIONS, "collection", " or ".join(COLLECTIONS))
    if c.collection == "ready-first":
        need(c.algo == "ddqn", "collection", "lockstep for algo=reinforce (it learns from whole rollouts)")
        need(c.backend in ("async", "ray"), "collection", f"lockstep for backend={c.backend!r} (ready-first needs "
                                                          f"async workers or Ray actors)")
    need(c.learner in LEARNERS, "learner", " or ".join(LEARNERS))
    need(isinstance(c.env_id, str) and c.env_id != "", "env_id", "a registered gymnasium env id")
    if c.env_kwargs.get("render_mode") == "human":
        raise ConfigError("invalid env_kwargs render_mode='human' for training: every env would draw each step "
                          "in a window of its own, at the display's frame rate; watch the trained agent with "
                          "fastrl eval RUN_DIR --render")
    need(c.num_envs >= 1, "num_envs", "a positive integer")
    need(c.num_workers >= 0, "num_workers", "an integer >= 0 (0 = automatic)")
    if c.num_workers:
        need(c.num_envs % c.num_workers == 0, "num_workers", f"a divisor of num_envs ({c.num_envs})")
    if c.collection == "ready-first" and c.num_envs > 1 and c.backend == "async":
        if (c.num_workers or default_workers(c.num_envs)) == c.num_envs:  # 0: one per core but the trainer's
            raise ConfigError(f"invalid collection='ready-first' with one env per worker process (num_workers="
                              f"num_envs={c.num_envs}{'' if c.num_workers else ' by default on this machine'}): "
                              f"pass --num-workers W, W < num_envs and dividing it, or use lockstep")
    need(1 <= c.threads <= thread_limit(), "threads", f"an integer in [1, {thread_limit()}] (this machine's CPUs)")
    need(c.total_steps >= 1, "total_steps", "a positive integer")
    need(c.time_limit_s >= 0, "time_limit_s", ">= 0 seconds (0 = no limit)")
    need(0 <= c.seed < SEED_LIMIT, "seed", "an integer in [0, 2**31)")
    need(len(c.hidden) >= 1 and all(h >= 1 for h in c.hidden), "hidden", "one or more positive widths")
    need(c.lr > 0 and math.isfinite(c.lr), "lr", "a positive number")
    need(math.isnan(c.lr_end) or 0 <= c.lr_end < math.inf, "lr_end", "a number >= 0, or nan for a constant lr")
    need(0 < c.gamma <= 1, "gamma", "in (0, 1]")
    need(c.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)")
    need(c.buffer_size >= 1, "buffer_size", "a positive integer")
    need(c.batch_size >= 1, "batch_size", "a positive integer")
    if c.algo == "ddqn":
        need(c.batch_size <= c.buffer_size, "batch_size", f"<= buffer_size ({c.buffer_size})")
        need(c.buffer_size >= 2 * c.num_envs, "buffer_size", f">= 2 * num_envs ({2 * c.num_envs})")
    need(c.n_step >= 1, "n_step", "an integer >= 1")
    if c.algo == "ddqn":  # a longer window than the ring keeps per env is never complete
        rows = math.ceil(c.buffer_size / c.num_envs)
        need(c.n_step <= rows, "n_step", f"<= the steps the ring keeps per env (buffer_size / num_envs = {rows})")
    need(c.learning_starts >= 0, "learning_starts", ">= 0")
    need(0 < c.replay_ratio < math.inf, "replay_ratio", "a positive number of updates per env step")
    need(c.target_update_interval >= 1, "target_update_interval", "an integer >= 1")
    need(0 < c.tau <= 1, "tau", "in (0, 1]")
    need(0 <= c.eps_end <= 1, "eps_end", "in [0, 1]")
    need(0 <= c.eps_start <= 1, "eps_start", "in [0, 1]")
    need(c.eps_decay_steps >= 1, "eps_decay_steps", "a positive integer")
    need(0 <= c.per_alpha < math.inf, "per_alpha", "a number >= 0 (0: uniform replay)")
    need(0 <= c.per_beta <= 1, "per_beta", "in [0, 1]")
    need(c.rollout_steps >= 1, "rollout_steps", "a positive integer")
    need(c.grad_steps >= 1, "grad_steps", "a positive integer")
    need(c.baseline in BASELINES, "baseline", " or ".join(BASELINES))
    need(0 <= c.entropy_coef < math.inf, "entropy_coef", "a number >= 0")
    need(0 <= c.value_coef < math.inf, "value_coef", "a number >= 0")
    need(0 <= c.importance_clip < math.inf, "importance_clip", "a number >= 0 (0: no importance weights)")
    need(c.eval_interval >= 0, "eval_interval", ">= 0")
    need(c.eval_episodes >= 1, "eval_episodes", "a positive integer")
    need(c.eval_envs >= 1, "eval_envs", "a positive integer")
    need(c.log_interval > 0, "log_interval", "a positive number of seconds")
    checkpoint_every(c.checkpoint_interval)
    need(c.profile_steps >= 1, "profile_steps", "a positive integer")
    need(c.trace_cycles >= 1, "trace_cycles", "a positive integer")
