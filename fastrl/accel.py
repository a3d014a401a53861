"""The one place that calls torch.compile and records CUDA graphs.

Only pure, fixed-shape functions are compiled (no .item(), no branches on tensor
values); the eager path runs the very same function, so the learner mode changes
speed, never maths.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

# Set while this process is being stopped (by fastrl.run.signals.StopRequest). A Ctrl-C
# reaches the whole process group, inductor's C++ compiler processes too: a compile that
# fails then was most likely cut short by the stop, and compiling again another way
# would keep the stop waiting for a second compile from scratch.
STOPPING = threading.Event()


def _warn(message: str) -> None:
    print(f"fastrl: {message}", file=sys.stderr)


def kernel_cache_dir() -> str:
    """Where compiled kernels are kept: TORCHINDUCTOR_CACHE_DIR if the user set it, else
    fastrl's folder in the user's cache ($XDG_CACHE_HOME, or ~/.cache), which a reboot
    does not empty, unlike torch's default under /tmp: a compiled learner step is then
    built once per machine, not once per boot."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = str(Path(root) / "fastrl" / "torchinductor")
    if any(c.isspace() for c in path):
        # Inductor's C++ build commands break on such a path: every compile would fail and
        # the learner run eagerly. torch's own folder (under /tmp) then.
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        return default_cache_dir()
    return path


def configure_inductor() -> None:
    """Sets up torch's inductor for fastrl's compiles, leaving alone what the user set:

    - Kernels go to `kernel_cache_dir()` (torch reads the variable when it compiles).
      Where that folder cannot be made (no writable home), torch's default stays.
    - No precompiled C++ header (TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS): a process
      builds it before its first C++ compile even when every kernel it needs is cached,
      and it lives under /tmp, so after a reboot a cached learner step would pay for it
      again; without it a cold compile is shorter too.
    - The CPU's own flags say which of AVX2 and AVX-512 the kernels use
      (TORCHINDUCTOR_VEC_ISA_OK): inductor otherwise builds and loads a test library
      for each (about a third of a first compile; the loading, a Python process per
      candidate, in every process, cached or not). Those tests only ever showed whether
      the compiler knows the flags, which every compiler inductor can use does; the
      newer extensions (VNNI, AMX, bf16) are still tested.

    (benchmarks/LOG.md, "cold start", measures each.)"""
    path = kernel_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    except OSError:
        pass
    # Imported only now: importing it sets TORCHINDUCTOR_CACHE_DIR to torch's default.
    from torch._inductor import config as inductor_config
    if "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS" not in os.environ:
        inductor_config.cpp_cache_precompile_headers = False
    if "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
        inductor_config.cpp.vec_isa_ok = True


@contextlib.contextmanager
def denormals_flushed():
    """Meanwhile, float32 numbers below 1.2e-38 (denormals) are read and written as zero by
    this thread's CPU arithmetic (torch.set_flush_denormal). Adam's first moment of a
    weight whose gradient stays zero (a dead ReLU unit) decays through that range, and
    each operation on a denormal takes the CPU a hundred cycles or so: the learner's fused
    optimizer kernel ran several times slower for it (benchmarks/LOG.md, 2026-12-08,
    "denormals flushed"). Numbers that small change no update. Only the calling thread flushes; with
    more torch threads, their intra-op threads do not. Afterwards flushing is off, torch's
    default: torch cannot tell whether the caller had turned it on."""
    flushing = torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def compile_fn(fn: Callable, enabled: bool = True, device: torch.device | None = None) -> Callable:
    """`torch.compile(fn)` when enabled. On the CPU, generated C++ rather than Python calls
    its kernels (inductor's `cpp_wrapper`): the same kernels and results, with less Python
    per step (benchmarks/compile_wrapper.py measures the gain). If compiling fails on this machine (e.g. no C++
    compiler), it warns once per failure and runs `fn` the next way: compiled without the
    C++ wrapper, then eagerly. While the process stops (`STOPPING`), a failed compile goes
    straight to eager: the stop's signal may have killed the compiler."""
    if not enabled:
        return fn
    configure_inductor()
    # Random numbers from torch's own generator, as eagerly: a compiled step draws what the
    # eager one would (the same batches), and inductor's in-kernel generator, recomputed in
    # each kernel that reads a draw, cost more per update (benchmarks/LOG.md, 2026-12-08,
    # "torch's own random numbers").
    options = {"fallback_random": True}
    # Best first: (what is tried, how `fn` runs when the way before it failed, the callable)
    ways = [("torch.compile", "compiled without the C++ wrapper", torch.compile(fn, dynamic=False, options=options)),
            (None, "eagerly", fn)]
    if device is not None and device.type == "cpu":
        ways.insert(0, ("torch.compile with the C++ wrapper", None,
                        torch.compile(fn, dynamic=False, options={**options, "cpp_wrapper": True})))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        while True:
            what, _, current = ways[0]
            if current is fn:
                return fn(*args, **kwargs)
            try:
                return current(*args, **kwargs)
            except Exception as exc:  # compile failures surface on the first call
                ways.pop(0)
                if STOPPING.is_set():
                    del ways[:-1]  # eagerly
                how = "eagerly, as the run is stopping" if STOPPING.is_set() else ways[0][1]
                _warn(f"{what} failed for {getattr(fn, '__name__', 'fn')} ({type(exc).__name__}: "
                      f"{_first_line(exc)}); running it {how}")

    return call


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


class Switch(Protocol):
    """When a learner step compiled elsewhere can be had here (see fastrl.precompile)."""

    def ready(self) -> bool:
        """False while the step is still being compiled elsewhere."""

    def switched(self, eager_updates: int, compile_s: float) -> None:
        """Told once the compiled step ran here: after how many eager updates, and how long
        its first call (compiling it here, from the cache) took."""


def learner_fn(fn: Callable, mode: str, device: torch.device | None = None, switch: Switch | None = None) -> Callable:
    """The learner update in a mode: eager (fn itself), compile (torch.compile), or
    cudagraphs (compiled, then recorded once in a CUDA graph and replayed).

    `switch` (compile only): the update runs eagerly until `switch.ready()`, then compiled."""
    if mode == "eager":
        return fn
    if mode == "compile":
        compiled = compile_fn(fn, device=device)
        return compiled if switch is None else EagerUntilReady(fn, compiled, switch)
    if mode == "cudagraphs":
        return CudaGraphFn(compile_fn(fn, device=device))
    raise ValueError(f"invalid learner mode {mode!r}: must be eager, compile or cudagraphs")


class EagerUntilReady:
    """Calls `eager` until `switch.ready()`, then `compiled` for good: the same maths, so a
    run can learn while its compiled step is being built elsewhere."""

    def __init__(self, eager: Callable, compiled: Callable, switch: Switch):
        self.eager, self.compiled, self.switch = eager, compiled, switch
        self.eager_calls = 0
        self.switched = False

    def __call__(self, *args):
        if self.switched:
            return self.compiled(*args)
        if not self.switch.ready():
            self.eager_calls += 1
            return self.eager(*args)
        started = time.perf_counter()
        out = self.compiled(*args)
        self.switched = True
        self.switch.switched(self.eager_calls, time.perf_counter() - started)
        return out


def _tensors(args: tuple) -> list[torch.Tensor]:
    """The tensors of `args`: tensors, or NamedTuples of tensors."""
    out: list[torch.Tensor] = []
    for a in args:
        out.extend(a if isinstance(a, tuple) else (a,))
    return out


def _clone(args: tuple) -> tuple:
    return tuple(type(a)(*(t.clone() for t in a)) if isinstance(a, tuple) else a.clone() for a in args)


class CudaGraphFn:
    """Runs `fn` by replaying a CUDA graph: one launch per update instead of one per kernel.

    The first WARMUP calls run `fn` normally on a side stream (compilation,
    autotuning); the next call records it and replays the record,
    so every call is one real update. `fn` must read and write only persistent device
    tensors (parameters, optimizer state, the replay ring) plus its arguments, which are
    copied into the graph's static inputs: fixed shapes, tensors or NamedTuples of tensors.
    The returned tensors are the graph's static outputs: the next call overwrites them.
    If recording fails, it warns once and keeps running `fn` without the graph.
    """

    WARMUP = 3

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_output: Any = None
        self.failed = False

    def __call__(self, *args):
        if self.graph is not None:
            for static, new in zip(self.static_inputs, _tensors(args)):
                static.copy_(new)
            self.graph.replay()
            return self.static_output
        self.calls += 1
        if self.failed:
            return self.fn(*args)
        if self.calls <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._record(args)

    def _record(self, args: tuple):
        static_args = _clone(args)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_output = self.fn(*static_args)
        except Exception as exc:
            _warn(f"recording the learner in a CUDA graph failed ({type(exc).__name__}: {_first_line(exc)}); "
                  f"running it compiled, without the graph")
            self.failed = True
            return self.fn(*args)
        self.graph, self.static_inputs = graph, _tensors(static_args)
        graph.replay()  # recording ran nothing: this is the update of this call
        return self.static_output
