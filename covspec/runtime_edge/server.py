"""The edge server: a ZeroMQ ROUTER in front of one model thread.

Python API (used by ``covspec edge serve``, the device tests and the demo)::

    from covspec.runtime_edge import EdgeServer, ServerConfig

    with EdgeServer("covspec/toy/models/target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        print(server.address)          # the bound endpoint, e.g. tcp://127.0.0.1:40123
        ...                            # devices talk the protocol (PROTOCOL.md) to server.address

``EdgeServer(model, config)`` takes a model folder (or an already loaded
``TargetModel``, so tests can share one) and a ``ServerConfig``; ``start()`` loads
the model, binds and starts two threads and returns once requests are served;
``stop()`` shuts down cleanly (every live session leaves its log line);
``wait()`` blocks until stopped. ``covspec.runtime_edge.process.EdgeProcess`` runs
the same server in a child process.

Threads: the *I/O thread* owns the ROUTER socket. It decodes every request
(``covspec.protocol.messages.decode`` with the configured limits), answers
malformed ones and pings itself, and queues the rest for the *model thread*
(``model_thread.ModelThread``), which alone touches the model and the sessions. Its replies
travel back to the I/O thread over an inproc PUSH/PULL pair. The server never crashes on a request: every
refusal is an ``Error`` reply with a code and a sentence.

What a device can rely on (the round logic itself lives in ``session.py``):

- ``open`` creates the session (an open for an existing id replaces it when it
  carries that session's owner secret, else ``not_owner``) and is
  answered ``opened`` with the first token, or the next one after ``committed`` on
  a reopen (``token`` -1 and ``done`` when those already ended generation). The
  vocabulary hash must match the target's tokenizer (``vocab_mismatch``); a
  ``target_only`` open may leave it empty. ``wire="dense"`` (the conventional baseline)
  takes the draft's full q per drafted position and returns the full p at the
  correction/bonus position beside the sampled token.
- ``verify`` is answered ``result``: ``stale`` (nothing changed) unless ``start``
  is the committed length (an ``edge_led`` chunk may start earlier, if its tokens
  there equal the committed ones) and ``assumed`` is -1 or the committed token
  before ``start``. A repeated ``seq`` gets the session's last reply again without
  recomputation; an older one gets ``replayed``. Errors are not remembered as replies.
- ``target_only`` and ``edge_led``: after ``opened`` the edge streams one ``result``
  per token it generates by itself, each with the open's ``seq``, ``start`` = the
  token's position and ``accepted`` 0 (``edge_led`` as ``edge_steps`` allows).
- ``close`` frees the session without a reply (a refused close is answered);
  ``ping`` gets ``pong`` with the number of live sessions and, to a v2 device, the
  edge's counters. A session silent for ``idle_timeout_s`` is dropped
  (``unknown_session`` afterwards: reopen with the committed tokens).
- Each session leaves one log line when it ends (closed, replaced, expired,
  shutdown): tokens, rounds, accepted mean, bytes in/out, prefill and verify time.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import zmq
import zmq.utils.monitor

from covspec.protocol import errors
from covspec.protocol.frames import is_int, parse_header, scalar
from covspec.protocol.messages import (MAX_SESSION_ID, PROTOCOL_VERSION, SUPPORTED_VERSIONS, Close, Error, Limits,
                                       Open, Ping, Pong, ProtocolError, Verify, decode, encode)
from covspec.runtime_edge.config import ConfigError, ServerConfig
from covspec.runtime_edge.model_thread import ModelThread, Request
from covspec.runtime_edge.target import TargetModel

log = logging.getLogger("covspec.edge")

_POLL_MS = 100
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "a device's key is not allowed (CurveZMQ authentication failed)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "a device spoke another security mechanism (e.g. no encryption)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "a device's handshake failed (e.g. it used another edge key)",
}
_BURST = 64          # messages moved per socket per I/O iteration, so neither direction starves


class EdgeServer:
    """Serves one target model to many device sessions over protocol v1."""

    def __init__(self, model: str | Path | TargetModel, config: ServerConfig = ServerConfig()):
        self.config = config.validate()
        self._model_source = model
        self.target: TargetModel | None = model if isinstance(model, TargetModel) else None
        self.address: str | None = None
        self._model_thread: ModelThread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._context: zmq.Context | None = None
        self._auth = None
        self._limits = Limits(max_array_bytes=config.max_message_bytes,
                              max_message_bytes=config.max_message_bytes)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> "EdgeServer":
        """Load the model (if given a folder), bind, start the threads; returns self."""
        if self.config.threads is not None:
            import torch
            torch.set_num_threads(self.config.threads)
        if self.target is None:
            self.target = TargetModel.load(self._model_source, device=self.config.device, dtype=self.config.dtype)
        if self.config.regime is not None:
            from covspec.regime import EdgePacing, load_regime
            self.target.pacing = EdgePacing(load_regime(self.config.regime).target)
        self._model_thread = ModelThread(self.target, self.config, self._stopping)
        context = self._context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        try:
            if self.config.curve:
                self._setup_curve(context, router)
            router.bind(_wildcard_port(self.config.bind))
        except (ConfigError, zmq.ZMQError) as exc:
            router.close(linger=0)
            self._close_context()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot bind {self.config.bind} ({exc}); pick another address or port.") from None
        self.address = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        inproc = f"inproc://covspec-edge-replies-{id(self)}"
        pull.bind(inproc)
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(inproc)
        # Each socket is used by one thread only from here on (thread start is the memory barrier).
        # Refused handshakes never reach the ROUTER as messages: the socket monitor reports them.
        monitor = router.get_monitor_socket(sum(_HANDSHAKE_FAILURES))
        self._threads = [threading.Thread(target=self._io_loop, args=(router, pull, monitor), name="edge-io",
                                          daemon=True),
                         threading.Thread(target=self._model_thread.run, args=(push,), name="edge-model", daemon=True)]
        for thread in self._threads:
            thread.start()
        target = self.target
        log.info("serving %s on %s (device=%s dtype=%s vocab=%d eos=%s curve=%s max_sessions=%d "
                 "max_context=%d idle_timeout_s=%g)", _model_name(self._model_source), self.address,
                 self.config.device, self.config.dtype, target.vocab_size, sorted(target.eos_ids),
                 "on" if self.config.curve else "off", self.config.max_sessions, self.config.max_context,
                 self.config.idle_timeout_s)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: finish the request in progress, log every live session, close sockets."""
        if self._stopping.is_set():
            self._stopped.wait(timeout)
            return
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)
        hung = [t.name for t in self._threads if t.is_alive()]
        for session in list(self._model_thread.sessions.values() if self._model_thread else ()):
            self._model_thread.end(session, "shutdown")
        if hung:   # a forward still running: leave its sockets to the daemon thread and the process exit
            log.warning("threads %s did not stop within %g s; not waiting for them", hung, timeout)
        else:
            self._close_context()
        self._stopped.set()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` finished (or ``timeout``); True if stopped."""
        return self._stopped.wait(timeout)

    @property
    def session_count(self) -> int:
        return len(self._model_thread.sessions) if self._model_thread else 0

    def counters(self) -> dict[str, int]:
        """Pong's counters since start: target forwards, committed tokens, milliseconds spent
        opening sessions and running rounds, peak memory, under a regime the forwards whose
        real compute overran their emulated time, and the prefix cache's hits, misses,
        evictions and bytes held, the follow-up questions that continued their session's cache, and
        the live sessions' KV bytes."""
        model_thread = self._model_thread
        if model_thread is None:
            return {"peak_bytes": peak_memory_bytes(self.config.device)}
        pacing = self.target.pacing.pacer.counts()
        prefix = model_thread.prefix_cache
        return {"forwards": model_thread.forwards, "committed": model_thread.committed,
                "prefill_ms": int(model_thread.prefill_s * 1000), "rounds_ms": int(model_thread.rounds_s * 1000),
                "peak_bytes": peak_memory_bytes(self.config.device),
                "overruns": pacing["overruns"], "overrun_ms": int(pacing["overrun_ms"]),
                "prefix_hits": prefix.hits, "prefix_misses": prefix.misses, "prefix_evictions": prefix.evictions,
                "prefix_bytes": prefix.nbytes, "turns_continued": model_thread.turns_continued,
                "kv_bytes": model_thread.kv_bytes}

    def __enter__(self) -> "EdgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _setup_curve(self, context: zmq.Context, router: zmq.Socket) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(str(self.config.secret_key))
        if secret is None:
            raise ConfigError(f"{self.config.secret_key} holds no secret key; pass the NAME.key_secret file "
                              "written by `covspec keys new`.")
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("covspec.edge.auth"))
        self._auth.start()
        if self.config.allow_keys is not None:
            self._auth.configure_curve(domain="*", location=str(self.config.allow_keys))
        else:
            log.warning("CurveZMQ without --allow-keys: traffic is encrypted but any client key is admitted")
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        router.curve_secretkey = secret
        router.curve_publickey = public
        router.curve_server = True

    def _close_context(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # --- I/O thread ----------------------------------------------------------------------

    def _io_loop(self, router: zmq.Socket, pull: zmq.Socket, monitor: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(_POLL_MS))
                while monitor in ready and monitor.poll(0):
                    event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
                    log.warning("denied a connection: %s", _HANDSHAKE_FAILURES.get(event, event))
                for _ in range(_BURST if pull in ready else 0):
                    try:
                        _send(router, pull.recv_multipart(flags=zmq.NOBLOCK))
                    except zmq.Again:
                        break
                for _ in range(_BURST if router in ready else 0):
                    try:
                        frames = router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        # With CurveZMQ the authenticator names each peer by its public key.
                        peer_key = frames[-1].get("User-Id") if self.config.curve else ""
                        self._receive(router, [frame.bytes for frame in frames], peer_key)
                    except Exception:  # noqa: BLE001 - the I/O thread must outlive any request
                        log.exception("failed to handle an incoming message")
        finally:
            router.disable_monitor()
            monitor.close(linger=0)
            router.close(linger=0)
            pull.close(linger=0)

    def _receive(self, router: zmq.Socket, frames: list[bytes], peer_key: str) -> None:
        identity, payload = frames[0], frames[1:]
        try:
            message = decode(payload, self._limits)
        except ProtocolError as exc:
            session, seq, version = _reply_address(payload, self._limits)
            log.debug("refused a malformed request: %s", exc)
            _send(router, [identity] + encode(Error(session=session, seq=seq, code=exc.code, message=exc.message,
                                                    version=version)))
            return
        if isinstance(message, Ping):
            _send(router, [identity] + encode(Pong(session=message.session, seq=message.seq, version=message.version,
                                                   sessions=self.session_count, **self.counters())))
            return
        if not isinstance(message, (Open, Verify, Close)):
            _send(router, [identity] + encode(Error(
                session=message.session, seq=message.seq, code=errors.UNEXPECTED_TYPE, version=message.version,
                message=f"the edge does not accept {message.TYPE!r} messages; devices send open, verify, close, ping.")))
            return
        try:
            self._model_thread.requests.put_nowait(Request(identity, message, sum(len(f) for f in payload), peer_key))
        except queue.Full:
            _send(router, [identity] + encode(Error(
                session=message.session, seq=message.seq, code=errors.BUSY, version=message.version,
                message=f"the edge has {self.config.max_queue} requests waiting; retry with backoff.")))


def _send(router: zmq.Socket, frames: list[bytes]) -> None:
    """Send to a peer; a peer that is gone or not reading loses the reply (never blocks)."""
    try:
        router.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        log.warning("dropped a reply: the peer is not reading")
    except zmq.ZMQError as exc:
        log.warning("dropped a reply: %s", exc)


def _reply_address(payload: list[bytes], limits: Limits) -> tuple[str, int, int]:
    """Best effort (session, seq, protocol version) of a request that failed to decode,
    for its error reply (a version this edge does not speak gets the newest)."""
    try:
        header = parse_header(payload[0], limits) if payload else {}
    except ProtocolError:
        return "", 0, PROTOCOL_VERSION
    session = _valid_or(header, "session", str, "")
    session = session if len(session) <= MAX_SESSION_ID else ""
    seq = _valid_or(header, "seq", int, 0)
    version = header.get("v")
    if not is_int(version) or version not in SUPPORTED_VERSIONS:
        version = PROTOCOL_VERSION
    return session, seq, version


def _valid_or(header: dict, name: str, kind: type, default):
    """``header[name]`` if it is a valid ``kind`` field, else ``default``."""
    try:
        return scalar(header, name, kind)
    except ProtocolError:
        return default


def peak_memory_bytes(device: str) -> int:
    """The CUDA allocator's peak on a GPU edge, else this process's peak resident set."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB


def _wildcard_port(bind: str) -> str:
    """Accept ``tcp://HOST:0`` as 'any free port' (zmq spells it ``*``)."""
    return bind[:-2] + ":*" if bind.startswith("tcp://") and bind.endswith(":0") else bind


def _model_name(source) -> str:
    return str(source) if not isinstance(source, TargetModel) else "a loaded target"
