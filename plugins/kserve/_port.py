"""An endpoint's address: one port for the endpoint's life, the server behind it swapped blue/green.

Every server of this plugin listens on the endpoint's port with ``SO_REUSEPORT``,
so the next server can bind the same port while the current one still serves.
Which of the two listeners a new connection reaches is decided by a one-instruction
classic BPF program attached to the port's reuseport group ("steering"); the
kernel keeps the group's listeners in an array, in the order they started
listening, and the program returns an index into it:

1. Between deploys the program says ``OLDEST`` (index 0). A new server that starts
   listening joins at index 1 and gets no public traffic (the deployer sets
   ``OLDEST`` again as soon as it sees the new socket listening, in case an
   interrupted deploy left the program otherwise). It also gets a private
   loopback socket on an ephemeral port, so the deployer can check *it*
   (readiness and a first completion) before anyone else talks to it.
2. Once it is ready and recorded as current, the program says ``NEWEST`` (index 1):
   new connections reach the new server, while the old one still accepts what
   already reached it. After ``DRAIN_S`` the old one gets SIGTERM; uvicorn closes
   its listener and lets in-flight requests finish. (Closing a listener resets the
   connections still queued on it, which is why traffic is steered away first.)
3. The new server is now alone at index 0, and the program goes back to ``OLDEST``.

Why this and not a small proxy process per endpoint: the kernel switches
atomically between two processes that both exist anyway, so there is no extra
hop on every request, no third process whose crash takes the endpoint down and
which itself cannot be replaced without moving the port, and the server sees
the client's address. The price is that it is Linux-only and relies on the
group's listeners being exactly the current server and the new one during a
deploy; the deployer makes that true by holding the endpoint's lock and
stopping stray servers of the endpoint first, and by refusing a port on which
anything else listens (``SO_REUSEPORT`` lets any process of the same user join a
port, which would split traffic between two endpoints). Where the program
cannot be attached, the endpoint keeps its address but the kernel spreads
connections over both servers during a swap, and the few queued on the old one
when it stops may be reset. On other systems two servers cannot share a port,
so each re-deploy moves the endpoint to a free port (and a fixed port cannot be
re-deployed without stopping the endpoint first).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import sys
from typing import Any

from aiplane.core.errors import ConfigError

__all__ = ["OLDEST", "NEWEST", "DRAIN_S", "problems", "claim", "private_socket", "Steering", "url_host"]

OLDEST, NEWEST = 0, 1
"""Steering targets: index 0 is the server that listened first (the current one), 1 the one after it."""
DRAIN_S = 0.5
"""After steering to the new server, how long the old one keeps accepting connections whose handshake began before."""

_REUSEPORT = sys.platform.startswith("linux")
"""Only Linux balances a TCP port between listeners, which is what a swap needs."""
_SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)  # asm-generic value; Python lacks the name
_BPF_RET_K = 0x06
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on ``host``."""
    host = _WILDCARDS.get(host, host)
    return f"[{host}]" if ":" in host else host


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    return family, addr


def _unresolvable(host: str, exc: Exception) -> str:
    return f"Serving host {host!r} cannot be resolved ({exc}); use an address such as 127.0.0.1."


def _overlaps(a: str, b: str) -> bool:
    """Whether listeners on addresses ``a`` and ``b`` (same port) would take each other's connections."""
    if a == b or "::" in (a, b):  # "::" is dual-stack by default
        return True
    if a in ("0.0.0.0", "") or b in ("0.0.0.0", ""):
        return (":" in a) == (":" in b)
    return False


def _foreign_listeners(ip: str, port: int, allowed_pid: int | None) -> list[str]:
    """Who else listens where a server on ``ip:port`` would: ``pid N (name)`` each, or ``another user's process``."""
    import psutil

    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if not _overlaps(conn.laddr.ip, ip) or (conn.pid is not None and conn.pid == allowed_pid):
            continue
        if conn.pid is None:
            found.append("another user's process")
            continue
        try:
            found.append(f"pid {conn.pid} ({psutil.Process(conn.pid).name()})")
        except psutil.Error:
            found.append(f"pid {conn.pid}")
    return sorted(set(found))


def _port_for(host: str, port: int, current: dict[str, Any] | None) -> int:
    """The port a new server binds: the current server's (same host, port unset or equal), else ``port``."""
    if current is not None and current.get("host") == host and port in (0, current.get("port")):
        return int(current["port"])
    return port


def problems(host: str, port: int, current: dict[str, Any] | None, name: str) -> list[str]:
    """Why a server of endpoint ``name`` could not serve on ``host:port``; no side effects.

    ``current`` is the endpoint's ``current.json`` when its server is alive. A port
    held by that server is fine (the next one shares it); anything else listening
    there is a problem, whether or not it set ``SO_REUSEPORT``.
    """
    try:
        _, addr = _resolve(host, port)
    except socket.gaierror as exc:
        return [_unresolvable(host, exc)]
    chosen = _port_for(host, port, current)
    if not chosen:
        return []
    holders = _foreign_listeners(addr[0], chosen, current["pid"] if current else None)
    if not holders:
        return []
    if chosen == port:
        return [
            f"port {port} on {host} is in use by {', '.join(holders)}; stop that, choose a free port, "
            "or use port: 0 to pick one."
        ]
    return [
        f"port {chosen} of endpoint {name!r} on {host} is also listened on by {', '.join(holders)}, so connections "
        "would be split between it and the endpoint's server; stop that process."
    ]


def claim(host: str, port: int, current: dict[str, Any] | None, name: str) -> tuple[socket.socket, str | None]:
    """A socket bound (not listening) where endpoint ``name``'s new server will serve, and a note for the log.

    The current server's port when it is alive on the same host, else ``port``
    (0: a free one). The note says why the endpoint moves when the current server
    holds its port without ``SO_REUSEPORT`` (an older aiplane started it) and the
    port is not fixed; with a fixed port that is a ConfigError instead.
    """
    try:
        family, addr = _resolve(host, port)
    except socket.gaierror as exc:
        raise ConfigError(_unresolvable(host, exc)) from None
    chosen = _port_for(host, port, current)
    try:
        return _bound(family, (addr[0], chosen, *addr[2:])), None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(f"Cannot listen on {host}:{chosen}: {exc.strerror or exc}") from None
    held_by_current = current is not None and chosen == current.get("port")
    if not held_by_current:
        raise ConfigError(f"port {chosen} on {host} is in use; choose a free port, or use port: 0 to pick one.")
    if _REUSEPORT:
        why = (
            f"the current server of endpoint {name!r} (pid {current['pid']}) holds port {chosen} without "
            "SO_REUSEPORT (an older aiplane started it), so the new server cannot share it"
        )
        when = "this once; later deploys keep it"
    else:
        why = (
            f"two servers cannot share a port on {sys.platform}, and the current server of endpoint {name!r} "
            f"(pid {current['pid']}) holds port {chosen}"
        )
        when = "(a swap keeps the address on Linux only)"
    if port:
        raise ConfigError(f"{why}; stop the endpoint (aiplane stop) and deploy again, or use port: 0 to move it.")
    sock = _bound(family, (addr[0], 0, *addr[2:]))
    return sock, f"{why}: the endpoint moves to port {sock.getsockname()[1]} {when}"


def _bound(family: socket.AddressFamily, addr: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _REUSEPORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def private_socket(family: socket.AddressFamily) -> socket.socket:
    """A loopback socket on an ephemeral port that reaches one server alone (no ``SO_REUSEPORT``)."""
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((loopback, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class Steering:
    """Which listener of a port new connections reach, set through ``sock``, one of the port's sockets.

    After the first failure it stops trying and keeps the reason in ``failure``,
    for one line in the deploy log.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.failure: str | None = None

    def listening(self) -> bool:
        """Whether ``sock`` listens yet: steering through it before that would break its ``listen()``."""
        if not _REUSEPORT:
            return True  # steering fails with the reason anyway
        return bool(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def to(self, index: int) -> bool:
        """Send new connections to the listener at ``index``; False if steering does not work here."""
        if self.failure is None:
            self.failure = _steer(self.sock, index)
        return self.failure is None


def _steer(sock: socket.socket, index: int) -> str | None:
    """Attach a program returning ``index`` to ``sock``'s reuseport group; None, or why that failed.

    An index past the last listener falls back to the kernel's hash, which is
    harmless with one listener.
    """
    if not _REUSEPORT:
        return "this platform does not balance a TCP port between listeners"
    insn = _SockFilter(_BPF_RET_K, 0, 0, index)
    prog = _SockFprog(1, ctypes.pointer(insn))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, bytes(prog))
    except OSError as exc:
        return f"attaching the steering program failed: {exc.strerror or exc}"
    return None
