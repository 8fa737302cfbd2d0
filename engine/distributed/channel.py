"""The plan's side channel: newline-delimited JSON over one TCP connection per follower.

Separate from MLX's ring sockets on purpose: a collective blocks until every rank
joins it, so it can neither carry "what to run next" before the ranks agree, nor
tell rank 0 that a peer has gone quiet. Messages are small (token ids, row lists,
block keys), JSON rather than pickle so a follower runs nothing but its own code.
"""

from __future__ import annotations

import json
import socket
import threading


class Channel:
    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()  # the plan and the heartbeat share the socket

    def send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self) -> dict:
        """The next message; EOFError when the peer closed the connection."""
        line = self._reader.readline()
        if not line:
            raise EOFError("the connection was closed")
        return json.loads(line)

    def close(self) -> None:
        for close in (self._reader.close, self.sock.close):
            try:
                close()
            except OSError:
                pass
