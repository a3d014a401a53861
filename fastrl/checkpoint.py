"""Atomic checkpoint save and safe load (no pickled code is executed), and the one-line
error for any of the run's files that cannot be written (`WriteFailed`)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from fastrl.errors import ConfigError, WriteFailed

FORMAT = "fastrl-checkpoint-v1"


@contextlib.contextmanager
def writing(what: str | os.PathLike):
    """Turns a failed write (an OSError: a full disk, permissions) into a WriteFailed naming `what`."""
    try:
        yield
    except OSError as exc:
        raise WriteFailed(f"cannot write {what}: {exc.strerror or exc}") from None


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temporary file, then renames it over `path`: readers never see a
    partial file, and a failed write (WriteFailed) leaves the old file as it was."""
    path = Path(path)
    tmp = None
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise


def make_dir(path: str | os.PathLike, option: str) -> Path:
    """Creates directory `path` (and its parents) and checks it can be written; an
    unusable path raises ConfigError with a one-line reason that names `option`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise ConfigError(f"invalid {option}={str(path)!r}: cannot write there ({exc.strerror or exc})") from None
    return path


def save(path: str | os.PathLike, config: dict, model: torch.nn.Module, meta: dict | None = None) -> None:
    """Weights plus the config that rebuilds the network (plain types only)."""
    payload = {
        "format": FORMAT,
        "config": json.loads(json.dumps(config)),  # plain JSON types: loadable with weights_only
        "meta": json.loads(json.dumps(meta or {})),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()  # serialized in memory: a full disk then fails in a plain file write
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())


def save_json(path: str | os.PathLike, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    """True when no float tensor of a state dict holds a nan or an infinity (one host sync)."""
    checks = [torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def load(path: str | os.PathLike) -> dict:
    """Loads with weights_only=True; raises ValueError with a one-line reason.
    `path` may also be a run directory holding a checkpoint.pt."""
    if os.path.isdir(path) and os.path.isfile(Path(path) / "checkpoint.pt"):
        path = Path(path) / "checkpoint.pt"
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {str(path)!r} is a directory without a checkpoint.pt")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} is not a loadable fastrl checkpoint "
                         f"({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a fastrl checkpoint (format {FORMAT} expected)")
    # fastrl no longer saves such weights (see run.Diverged); an older version did.
    if not all_finite(payload.get("model", {})):
        raise ValueError(f"checkpoint {str(path)!r} holds weights that are not finite (nan or inf): "
                         f"the run that saved it had diverged")
    return payload
