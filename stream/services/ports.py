"""Free TCP ports on 127.0.0.1 for the local services."""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All sockets stay bound until every port is chosen, so the ports differ from each other.
    Another process can still take a port before the service binds it.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    """Return one TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def is_listening(port: int, *, timeout_s: float = 0.5) -> bool:
    """Return whether a TCP connection to 127.0.0.1:`port` succeeds."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s):
            return True
    except OSError:
        return False
