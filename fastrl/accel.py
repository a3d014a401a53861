"""The one place that calls torch.compile.

Only pure, fixed-shape functions are compiled (no .item(), no branches on tensor
values); the eager path runs the very same function, so `--no-compile` changes
speed, never maths.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

import torch


class _DropProfilerNotice(logging.Filter):
    # Dynamo warns once per compiled optimizer that it skips the optimizer's
    # profiler annotation; harmless, and noise on every run.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Profiler record function" not in record.getMessage()


def compile_fn(fn: Callable, enabled: bool = True) -> Callable:
    """`torch.compile(fn)` when enabled; falls back to eager (with one warning) if
    compilation fails on this machine, e.g. no C++ compiler for the CPU backend."""
    if not enabled:
        return fn
    logger = logging.getLogger("torch._dynamo.variables.ctx_manager")
    if not any(isinstance(f, _DropProfilerNotice) for f in logger.filters):
        logger.addFilter(_DropProfilerNotice())
    compiled = torch.compile(fn, dynamic=False)
    current = [compiled]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if current[0] is fn:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # compile failures surface on the first call
            name = getattr(fn, "__name__", "fn")
            print(f"fastrl: torch.compile of {name} failed ({type(exc).__name__}); running it eagerly",
                  file=sys.stderr)
            current[0] = fn
            return fn(*args, **kwargs)

    return call

