"""A TCP relay on loopback that drops connections: a store that is restarting, or a network that drops out."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

__all__ = ["FlakyRelay"]


class FlakyRelay:
    """A TCP relay on loopback in front of the S3 server; it resets the first ``drop`` connections on arrival,
    as a store that is restarting or a network that drops out does."""

    def __init__(self, endpoint_url: str, drop: int):
        host, port = endpoint_url.removeprefix("http://").rsplit(":", 1)
        self.target, self.drop, self.dropped = (host, int(port)), drop, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.dropped < self.drop:
                self.dropped += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a goodbye
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for end in (a, b):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()
