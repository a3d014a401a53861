"""Ray, for what runs beyond one machine (`--backend ray`, `fastrl sweep --ray`): joining
a cluster, or starting a local instance, and the one-line errors when neither can be done.

Ray is an optional extra (`pip install 'fastrl[ray]'`); nothing else in fastrl imports it.
"""
from __future__ import annotations

import logging
import os
import socket
from types import ModuleType

from fastrl.errors import ConfigError
from fastrl.interrupts import import_held

INSTALL = "pip install 'fastrl[ray]'"


def import_ray() -> ModuleType:
    """The ray module; a ConfigError saying how to install it if it is missing."""
    try:
        ray = import_held("ray")
    except ImportError:
        raise ConfigError(f"Ray is not installed: {INSTALL}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ConfigError if nothing answers at `address` (host:port of a Ray head's GCS): said
    at once, where ray.init would retry for a long while before failing in many lines."""
    if address in ("", "auto", "local") or address.startswith("ray://"):
        return  # "auto" reads the address of a cluster started on this machine; ray:// is Ray Client's
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"invalid ray address {address!r}: must be HOST:PORT (the head node's, as `ray start "
                          f"--head` prints it), auto, or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (is `ray start "
                          f"--head` running there, and the port open?)") from None


def connect(address: str = "", num_cpus: int | None = None) -> bool:
    """Joins the Ray cluster at `address` (host:port, auto, ray://host:port), or with an
    empty address the one RAY_ADDRESS names, else starts a local instance with `num_cpus`
    CPUs. Returns whether this call started Ray in this process (and so should shut it
    down). A driver already connected stays connected wherever it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    check_reachable(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.ERROR)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address or 'a local instance'}: "
                          f"{str(exc).splitlines()[0]}") from None
    return True


def check_cpus(needed: float, what: str) -> None:
    """A ConfigError if the cluster has fewer than `needed` CPUs in all: Ray would leave the
    work pending for good rather than fail."""
    total = import_ray().cluster_resources().get("CPU", 0.0)
    if total < needed:
        raise ConfigError(f"the Ray cluster has {total:g} CPUs and {what} needs {needed:g}: add nodes, or ask for "
                          f"fewer")
