"""Every exception fastrl raises on purpose, each a one-line message meant for the user.

`fastrl` re-exports them. What an error carries (an env's traceback, the name of the
env's own exception class) is a field of the typed exception, set where it is raised.
"""
from __future__ import annotations

import traceback


class ConfigError(ValueError):
    """An invalid setting; the message quotes the bad value and what is allowed."""


class WriteFailed(RuntimeError):
    """A file of the run could not be written (disk full, permissions): one line naming it."""


class WorkerDied(RuntimeError):
    """A worker process (env or evaluation) ended while the trainer relied on it."""


class Diverged(RuntimeError):
    """Training produced a nan or an infinity: in a learner statistic (read when logged)
    or in the network's weights (checked before each evaluation and checkpoint). The
    message says whether the env gave non-finite observations or rewards (still in the
    ring) or the learner itself diverged. The run saves no weights from then on: its
    checkpoint keeps those of the evaluation before."""


class EnvError(RuntimeError):
    """An env raised an error in its step, reset or autoreset (or, as the subclasses say,
    while it was made or closed).

    `trace` is the env's own traceback, from the process that ran it, for whoever wrote
    the env ("" where there is none to show); `error_type` is the name of the env's
    exception class. Only strings: it crosses a worker's pipe as itself, whatever the
    env raised (an exception class that would not pickle, or not unpickle)."""

    def __init__(self, message: str, trace: str = "", error_type: str = ""):
        super().__init__(message)
        self.trace = trace
        self.error_type = error_type

    def __reduce__(self):
        return type(self), (str(self), self.trace, self.error_type)

    @classmethod
    def of(cls, exc: BaseException, failed: str = "", chain: bool = True) -> "EnvError":
        """The error for `exc`, which an env raised: "an env raised T: message", or
        "`failed`: it raised T: message" (e.g. failed="LunarLander-v3 could not be made").
        `chain=False` leaves out of the traceback the exceptions `exc` was raised during.
        An EnvError is returned as it is."""
        if isinstance(exc, EnvError):
            return exc
        name = type(exc).__name__
        what = f"{failed}: it raised" if failed else "an env raised"
        return cls(f"{what} {name}: {exc}", "".join(traceback.format_exception(exc, chain=chain)), name)


class EnvMakeError(EnvError):
    """An env could not be made (gymnasium.make raised), here or in an env worker."""


class EnvCloseError(EnvError):
    """An env's close() raised. After a run's work it is a warning (see envs.close_envs)."""


class BadEnvOutput(EnvError):
    """An env's reset() or step() returned what does not fit gymnasium's API: the message
    says what. fastrl found it, the env raised nothing: there is no traceback to show."""
