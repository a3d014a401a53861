"""Checkpoints: saved atomically, with a checksum of their contents, and loaded safely
(no pickled code is executed; a file that is not whole is refused in one line). Also
the one-line error for any of the run's files that cannot be written (`WriteFailed`).

Two kinds, each a dict with a "format" tag:
  checkpoint.pt  the policy: weights, the config that rebuilds the network, meta
                 (`save`, `load`; what `fastrl eval`, `fastrl.load` and export read)
  state.pt       everything a resumed run continues from (`save_payload`, `load_payload`)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastrl.errors import ConfigError, WriteFailed

FORMAT = "fastrl-checkpoint-v2"
STATE_FORMAT = "fastrl-state-v1"
META_KEYS = {"env_steps": int, "updates": int, "obs_shape": list, "n_actions": int}


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
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash of the machine keeps one whole file
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """For writers that need a file name (an encoder, an exporter): yields a temporary
    path beside `path`, renamed over it when the block succeeds and removed otherwise,
    so that `path` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def digest(value: Any) -> str:
    """SHA-256 of a payload's contents (tensors by dtype, shape and bytes; dict keys in
    order), so a load can tell a whole file from one with bytes changed in it."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().contiguous()
            h.update(f"T{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            h.update(f"D{len(v)}".encode())
            for k, x in v.items():
                feed(k)
                feed(x)
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for x in v:
                feed(x)
        else:
            h.update(f"{type(v).__name__}:{v!r};".encode())

    feed(value)
    return h.hexdigest()


def save_payload(path: str | os.PathLike, payload: dict) -> int:
    """Writes `payload` (plain types and CPU tensors, a "format" tag) with its checksum,
    atomically; returns the file's size in bytes."""
    payload = {**payload, "sha256": digest(payload)}
    buffer = io.BytesIO()  # serialized in memory: a full disk then fails in a plain file write
    torch.save(payload, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    return len(data)


def load_payload(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """Loads a file written by save_payload with weights_only=True and checks its format
    tag and checksum; raises ValueError with a one-line reason naming `what` and `path`."""
    name = f"{what} {str(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{name} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{name} is not a loadable fastrl {what}: truncated, corrupted or not fastrl's "
                         f"({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else None
        older = f" (it is {found}: written by another fastrl version)" if isinstance(found, str) else ""
        raise ValueError(f"{name} is not a fastrl {what} (format {fmt} expected){older}")
    saved = payload.pop("sha256", None)
    if saved != digest(payload):
        raise ValueError(f"{name} is corrupted: its contents do not match the checksum it was saved with")
    return payload


def save(path: str | os.PathLike, config: dict, weights: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Weights (a state dict) plus the config that rebuilds the network (plain types only)."""
    save_payload(path, {
        "format": FORMAT,
        "config": json.loads(json.dumps(config)),  # plain JSON types: loadable with weights_only
        "meta": json.loads(json.dumps(meta or {})),
        "model": {k: v.detach().cpu() for k, v in weights.items()},
    })


def save_json(path: str | os.PathLike, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    """True when no float tensor of a state dict holds a nan or an infinity (one host sync)."""
    checks = [torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def load(path: str | os.PathLike) -> dict:
    """Loads a policy checkpoint with weights_only=True; raises ValueError with a one-line
    reason (not whole, not a fastrl checkpoint, contents of the wrong kind, weights not
    finite). `path` may also be a run directory holding a checkpoint.pt."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"fastrl.load and fastrl.evaluate take a checkpoint's path (a checkpoint.pt or a run "
                        f"directory holding one), not {type(path).__name__}")
    if os.path.isdir(path) and os.path.isfile(Path(path) / "checkpoint.pt"):
        path = Path(path) / "checkpoint.pt"
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {str(path)!r} is a directory without a checkpoint.pt")
    payload = load_payload(path, FORMAT, "checkpoint")
    name = f"checkpoint {str(path)!r}"
    config, meta, model = payload.get("config"), payload.get("meta"), payload.get("model")
    if not isinstance(config, dict):
        raise ValueError(f"{name} holds no config")
    missing = [k for k, kind in META_KEYS.items() if not isinstance((meta or {}).get(k), kind)]
    if missing:
        raise ValueError(f"{name} lacks meta {', '.join(missing)}")
    if not isinstance(model, dict) or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ValueError(f"{name} holds no network weights (a state dict of tensors)")
    # fastrl no longer saves such weights (see run.Diverged); an older version did.
    if not all_finite(model):
        raise ValueError(f"{name} holds weights that are not finite (nan or inf): "
                         f"the run that saved it had diverged")
    return payload
