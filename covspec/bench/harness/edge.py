"""The edge a bench measures, as a child process, and one-shot requests to it.

- ``start_edge(target_dir, bind, log_path, **config)``: ``covspec edge serve`` in a
  child process (``EdgeProcess``) with one torch thread, logging to ``log_path``;
- ``ask(address, message)``: one request on a fresh DEALER socket, the decoded reply
  or None after ``timeout_s`` (a ping, a probe with a wrong owner secret, ...);
- ``live_sessions(address)``: the edge's session count from a ping, None when it does
  not answer.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from covspec.protocol.messages import Ping, decode, encode
from covspec.runtime_edge import EdgeProcess, ServerConfig


def start_edge(target_dir: Path, bind: str, log_path: Path, **config) -> EdgeProcess:
    """``covspec edge serve`` in a child with one torch thread, logging to ``log_path``."""
    return EdgeProcess(target_dir, ServerConfig(bind=bind, threads=1, **config), log_path=log_path).start()


def ask(address: str, message, timeout_s: float = 5.0):
    """One request on a fresh socket: the decoded reply, or None."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        socket.send_multipart(encode(message))
        return decode(socket.recv_multipart()) if socket.poll(int(timeout_s * 1000)) else None
    finally:
        socket.close(linger=0)


def live_sessions(address: str) -> int | None:
    reply = ask(address, Ping(session="", seq=0))
    return None if reply is None else reply.sessions
