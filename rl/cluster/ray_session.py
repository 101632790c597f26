"""Connecting to Ray: a local cluster of the run's own, or an existing cluster by address."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from rl import stop_signals
from rl.config import ConfigError

_RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
# A run's own cluster is one machine, and all its traffic stays on loopback. Not 127.0.0.1: Ray
# replaces that address (and "localhost") with the machine's network address.
LOCAL_NODE_ADDRESS = "127.0.0.2"
_CONNECT_TIMEOUT_S = 10.0


def connect(address: str | None = None, verbose: bool = False) -> str:
    """Start or join Ray for one run; returns a line saying which.

    `address` (or `RAY_ADDRESS`, which `ray job submit` sets) joins an existing cluster. Without
    one, k2rl starts a local single-node cluster of its own (`address="local"`), so a session file
    left by a Ray head that was killed uncleanly never matters. `verbose` shows the workers' logs.
    """
    address = address or os.environ.get("RAY_ADDRESS", "")
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if not address or address == "local":
        with _sigterm_handler_kept():
            ray.init(
                address="local",
                _node_ip_address=LOCAL_NODE_ADDRESS,
                include_dashboard=False,
                object_store_memory=256 * 1024**2,
                runtime_env=_RUNTIME_ENV,
                **quiet,
            )
        return "started a local Ray cluster"
    _check_reachable(address)
    if ray.is_initialized():
        raise ConfigError(f"cannot join the Ray cluster at {address}: this process is already connected to a Ray cluster")
    try:
        with _sigterm_handler_kept():
            ray.init(address=address, runtime_env=_RUNTIME_ENV, **quiet, **_attach_to(address))
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot join the Ray cluster at {address}: {str(error).strip().splitlines()[-1]}") from None
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return f"joined the Ray cluster at {address} ({len(nodes)} nodes)"


def _sigterm_handler_kept():
    """ray.init sets a SIGTERM handler that exits at once, skipping the command's cleanup; the
    handler the command had (the command line's maps SIGTERM to Ctrl-C) is put back."""
    return stop_signals.kept((signal.SIGTERM,))


@contextmanager
def ray_session(address: str | None = None, verbose: bool = False) -> Iterator[str]:
    """Ray for one command (`connect`), shut down when it ends; yields connect's line. Without an
    address, a Ray that this process had already initialised (a program or test that drives k2rl
    in-process) is used as it is and left running."""
    if ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        yield "using the Ray cluster this process is connected to"
        return
    # A Ray this process already had is left alone even when joining another fails; a Ray started
    # here is shut down however the command ends, also when interrupted while Ray starts.
    started_here = not ray.is_initialized()
    try:
        yield connect(address, verbose)
    finally:
        if started_here:
            ray.shutdown()


def error_summary(error: BaseException) -> str:
    """The last line of a Ray error's text: the exception itself, without the remote traceback
    (nor the link to a validation library's documentation that some errors end with)."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip() and "For further information visit" not in line]
    return lines[-1] if lines else type(cause).__name__


def _attach_to(address: str) -> dict:
    """A cluster joined at a loopback address (a head started on this machine with
    `--node-ip-address=127.0.0.N`): the driver attaches to that node, by its address. Elsewhere Ray
    finds the driver's node by the route to the head."""
    host = address.rpartition(":")[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return {}
    return {"_node_ip_address": host} if loopback else {}


def _check_reachable(address: str) -> None:
    """Fail in seconds, with one line, when nothing answers at a `host:port` address (Ray itself
    retries for minutes). `ray://` client addresses and `auto` are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} must look like HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise ConfigError(f"no Ray cluster answers at {address} ({error.strerror or error})") from None
