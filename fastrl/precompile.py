"""Compiling a run's learner step in a process of its own while the run learns eagerly.

The first `torch.compile` of a learner step on a machine takes tens of seconds on a small
CPU (tracing, then building its C++ kernels), and a run that compiles at its first update
waits that long. Instead, when this machine has not compiled this learner step before
and the run leaves a core free, `Precompile` starts
`python -m fastrl.precompile`, which builds the same learner on throwaway tensors and
calls its compiled step once, filling the kernel cache. The run updates with the eager
step (the same maths) until that process is done, then compiles the step itself, now from
the cache, in a few seconds (see accel.EagerUntilReady). Where the cache already holds
the step, the run compiles at once, as before, and runs repeat exactly; a first run's
switch from eager to compiled depends on timing.

Only for DDQN with `--learner compile` on the CPU (the default there); CUDA runs compile
in their own process. REINFORCE compiles at its first update, as before: its CartPole
preset is so sensitive to the rounding of its updates that a first run's eager updates
took one seed from solving to not (benchmarks/LOG.md, "a first run's compile"), and
runs that repeat exactly matter more there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from fastrl import accel
from fastrl.config import TrainConfig, busy_cores
from fastrl.envs import EnvSpec
from fastrl.envs.process import init_worker
from fastrl.system import available_memory, cpu_capacity

# What cannot change the learner's graph: a run that differs from a compiled one only in
# these finds its step in the cache. (A field missing here only costs a needless
# background compile, which finds everything cached; one listed wrongly, a compile at the
# first update, as without this module.)
NOT_IN_THE_GRAPH = (
    "seed", "device", "learner", "total_steps", "time_limit_s", "run_dir", "backend", "num_workers", "ray_address",
    "collection", "pin_workers", "lr", "lr_end", "learning_starts", "replay_ratio", "eps_start", "eps_end",
    "eps_decay_steps", "per_beta", "eval_interval", "eval_episodes", "eval_envs", "stop_on_solve", "solve_threshold",
    "checkpoint_interval", "video", "log_interval", "progress", "timers", "profile_steps", "trace_cycles",
    "env_id", "env_kwargs",  # the spec's shapes stand for the env
)


def learner_key(config: TrainConfig, spec: EnvSpec, groups: int) -> str:
    """A name for the compiled learner step of this config, env shape and group count,
    with this torch, Python and the inductor settings that change its cache key."""
    from torch._inductor import config as inductor_config
    relevant = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_THE_GRAPH}
    what = {"config": relevant, "obs_shape": spec.obs_shape, "n_actions": spec.n_actions,
            "max_episode_steps": spec.max_episode_steps, "groups": groups, "torch": torch.__version__,
            "python": sys.version, "vec_isa_ok": inductor_config.cpp.vec_isa_ok}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def marker(key: str) -> Path:
    """The file that says the kernel cache holds learner step `key` (written once it does)."""
    return Path(accel.kernel_cache_dir()) / "fastrl-learners" / key


class Precompile:
    """The background compile of one run's learner step: the `accel.Switch` that the
    learner's update follows. Started and closed by `Run.precompile`; `needed` says
    whether a run needs one at all."""

    def __init__(self, config: TrainConfig, spec: EnvSpec, groups: int, announce: Callable[[str], None]):
        self.announce = announce
        self.key = learner_key(config, spec, groups)
        payload = {"config": config.to_dict(), "spec": dataclasses.asdict(spec), "groups": groups, "key": self.key,
                   "trainer": os.getpid()}
        self.started = time.perf_counter()
        self.errors = tempfile.TemporaryFile()  # the compiler's warnings could fill a pipe and stall it
        # Its own session: a Ctrl-C at the terminal is the trainer's to handle, and close()
        # ends the compiler processes it starts too. It dies with the trainer (see main();
        # no preexec_fn, which may deadlock in a process with threads).
        self.process: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "fastrl.precompile"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=self.errors, start_new_session=True)
        self.process.stdin.write(json.dumps(payload).encode())
        self.process.stdin.close()
        # What the run's summary reports (`summary()`).
        self.ready_after_s: float | None = None
        self.failed: str | None = None
        self.eager_updates: int | None = None
        self.compile_s: float | None = None

    @staticmethod
    def needed(config: TrainConfig, spec: EnvSpec, device: torch.device, groups: int, storage_bytes: int) -> bool:
        """Whether a run should compile its learner in the background: DDQN compiled on the
        CPU, not profiling, the step not yet in the cache, a core that the run leaves free, and
        room in memory for a second copy of the run's storage (the other process builds one).
        Without a free core the compile slows the run about as much as the eager updates
        gain (benchmarks/LOG.md, "cold start")."""
        if config.algo != "ddqn" or config.learner != "compile" or device.type != "cpu" or config.profile:
            return False
        if cpu_capacity() < busy_cores(config) + 1:
            return False
        memory = available_memory()
        if memory is not None and storage_bytes > 0.25 * memory:
            return False
        accel.configure_inductor()
        return not marker(learner_key(config, spec, groups)).exists()

    def ready(self) -> bool:
        """False while the other process compiles; True once it has ended (the switch then
        compiles here: from the cache, or from scratch if it failed)."""
        if self.ready_after_s is not None:
            return True
        if self.process.poll() is None:
            return False
        self.ready_after_s = time.perf_counter() - self.started
        if self.process.returncode != 0:
            self.errors.seek(0)
            lines = self.errors.read().decode(errors="replace").strip().splitlines()
            self.failed = lines[-1] if lines else f"exit status {self.process.returncode}"
        self.close()
        return True

    def switched(self, eager_updates: int, compile_s: float) -> None:
        self.eager_updates, self.compile_s = eager_updates, compile_s
        where = (f"compiling it in the background failed ({self.failed}), so here" if self.failed else
                 f"{self.ready_after_s:.1f} s in the background, then {compile_s:.1f} s here from the cache")
        self.announce(f"the learner step is compiled ({where}); {eager_updates:,} updates ran eagerly meanwhile")

    def summary(self) -> dict:
        return {"background_s": self.ready_after_s, "failed": self.failed, "eager_updates": self.eager_updates,
                "compile_here_s": self.compile_s}

    def close(self) -> None:
        """Ends the other process and its compilers if they still run (the run ended first)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.errors.close()
        self.process = None


def main() -> None:
    """Builds the run's learner on throwaway tensors, as the training loop does, and calls
    its compiled step once, so that the kernel cache holds it; then leaves the marker."""
    payload = json.load(sys.stdin)
    init_worker()  # dies with its parent from now on
    if os.getppid() != payload["trainer"]:  # the trainer died before that
        return
    config = TrainConfig.from_dict(payload["config"])
    spec_fields = payload["spec"]
    spec = EnvSpec(**{**spec_fields, "obs_shape": tuple(spec_fields["obs_shape"]),
                      "render_modes": tuple(spec_fields["render_modes"])})
    from fastrl import training  # the loop's own construction, so that the graph is the run's

    torch.set_num_threads(config.threads)
    training.first_compiled_update(config, spec, torch.device("cpu"), payload["groups"])
    path = marker(payload["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


if __name__ == "__main__":
    main()
