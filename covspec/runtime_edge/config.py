"""Typed configuration of the edge server, validated once before any work starts.

``ServerConfig`` holds every knob of ``covspec edge serve``; ``validate()`` raises
``ConfigError`` with one precise sentence per problem. Nothing here imports torch or
touches a socket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
EDGE_STEPS = ("auto", "always", "never")
LOCAL_TRANSPORTS = ("inproc://", "ipc://")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


class ConfigError(ValueError):
    """A server configuration that cannot work; the message says what to change."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything the edge server needs besides the model folder.

    Limits bound memory: ``max_sessions`` live sessions (each holds a KV cache),
    ``max_context`` tokens per session (context + generated), ``max_message_bytes``
    per request (also set on the socket as ``zmq.MAXMSGSIZE``: a peer that sends more
    is disconnected), ``idle_timeout_s`` after which a silent session is dropped and
    its cache freed, ``finished_timeout_s`` after which a session that finished
    generating gives up its slot (its cache is freed at once; until then it answers
    repeated requests; a full edge takes finished slots back at once; a conversation's
    session keeps its cache for the next question, for ``idle_timeout_s``, unless its
    slot or KV is needed),
    ``max_image_pixels`` per decoded image and ``max_image_aspect`` its longest to
    shortest side (both checked before decoding), ``max_queue`` requests waiting for
    the model. The scheduler runs the ready rounds of up to ``max_batch`` sessions as
    one target forward (1: one session per forward, unbatched), with at most
    ``max_batch_tokens`` input tokens in it. Opens prefill in pieces beside the rounds
    (``scheduler.py``): an image with what precedes it in one piece, the rest of the prompt
    in chunks of at most ``prefill_chunk`` tokens per session and forward, and at most
    ``prefill_tokens`` prefill tokens an iteration (the oldest opening session always gets
    a piece). ``edge_steps`` says when the target of an
    ``edge_led`` session generates by itself instead of waiting for the device's next
    chunk: ``always``, ``never`` (the session then runs like a ``speculative`` one) or
    ``auto``: while the edge has room (the iteration's rounds fill less than half of
    ``max_batch`` and of ``max_batch_tokens``), else it waits for chunks, which yield
    more tokens per forward. ``threads`` sets torch's intra-op threads (None: torch's default; on a
    CPU shared with other work, fewer threads are often much faster). ``regime`` (a
    ``covspec.regime`` name, ``DEVICE@TARGET``, or a profile file) pads every target forward
    to what the regime's target model would take on its GPU (None: real time only).
    ``kv_budget`` bounds, in bytes, the KV cache the live sessions may take (each charged
    ``Session.kv_bytes()``: its context plus ``max_new_tokens`` at its cache's bytes per
    position); an open beyond it is answered ``busy`` (None: no bound but ``max_sessions``).
    ``prefix_cache_bytes`` bounds the edge's prefix cache (``prefix_cache.py``: sessions
    about the same image start from a cached prefix of the context; 0: off); it is held
    apart from ``kv_budget``.
    """

    bind: str = "tcp://127.0.0.1:5555"
    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = 64
    max_context: int = 4096
    max_message_bytes: int = 16 * 1024 * 1024
    idle_timeout_s: float = 300.0
    finished_timeout_s: float = 10.0
    max_image_pixels: int = 4096 * 4096
    max_image_aspect: float = 20.0
    max_queue: int = 1024
    max_batch: int = 64
    max_batch_tokens: int = 2048
    prefill_chunk: int = 32
    prefill_tokens: int = 256
    edge_steps: str = "auto"
    secret_key: Path | None = None
    allow_keys: Path | None = None
    insecure: bool = False
    threads: int | None = None
    regime: str | None = None
    kv_budget: int | None = None
    prefix_cache_bytes: int = 0

    def validate(self) -> "ServerConfig":
        """Return self if usable; raise ConfigError naming the first problem."""
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"device {self.device!r} is not supported; use one of {', '.join(DEVICES)} (or cuda:N).")
        if self.edge_steps not in EDGE_STEPS:
            raise ConfigError(f"edge_steps {self.edge_steps!r} is not one of {', '.join(EDGE_STEPS)}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
        for name in ("max_sessions", "max_context", "max_message_bytes", "max_image_pixels", "max_queue",
                     "max_batch", "max_batch_tokens", "prefill_chunk", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.regime is not None:
            from covspec.regime import RegimeError, load_regime
            try:
                load_regime(self.regime)
            except RegimeError as exc:
                raise ConfigError(f"--regime: {exc}") from None
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}.")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise ConfigError(f"kv_budget must be >= 1 byte, got {self.kv_budget}; leave it out for no bound.")
        if self.prefix_cache_bytes < 0:
            raise ConfigError(f"prefix_cache_bytes must be >= 0 (0: off), got {self.prefix_cache_bytes}.")
        for name in ("idle_timeout_s", "finished_timeout_s", "max_image_aspect"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.max_message_bytes < 4096:
            raise ConfigError("max_message_bytes below 4096 cannot carry an open request; raise it.")
        if not re.match(r"^(tcp|ipc|inproc)://.+", self.bind):
            raise ConfigError(f"bind address {self.bind!r} must look like tcp://HOST:PORT (or ipc://, inproc://).")
        if self.allow_keys is not None and self.secret_key is None:
            raise ConfigError("--allow-keys needs --secret-key: CurveZMQ admits clients only on an encrypted socket.")
        if self.secret_key is not None and not Path(self.secret_key).is_file():
            raise ConfigError(f"secret key file {self.secret_key} does not exist; make one with `covspec keys new DIR --name edge`.")
        if self.allow_keys is not None and not Path(self.allow_keys).is_dir():
            raise ConfigError(f"--allow-keys {self.allow_keys} is not a folder of client public keys (*.key).")
        if self.secret_key is None and not self.insecure and not is_local_bind(self.bind):
            raise ConfigError(
                f"binding {self.bind} without keys would expose the edge unencrypted on the network; "
                "pass --secret-key (and --allow-keys), or --insecure if that is really intended.")
        return self

    @property
    def curve(self) -> bool:
        return self.secret_key is not None


def option_name(field: dataclasses.Field) -> str:
    """The ``covspec edge serve`` option that sets ``field`` of ``ServerConfig``: its name
    in kebab case, without a unit suffix (``idle_timeout_s`` -> ``--idle-timeout``)."""
    return "--" + field.name.removesuffix("_s").replace("_", "-")


def serve_args(config: ServerConfig) -> list[str]:
    """The ``covspec edge serve`` options that rebuild ``config`` (every field that is set)."""
    args: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool):
            args += [option_name(field)] if value else []
        elif value is not None:
            args += [option_name(field), str(value)]
    return args


def is_local_bind(bind: str) -> bool:
    """True when ``bind`` is reachable from this machine only (loopback tcp, ipc, inproc)."""
    if bind.startswith(LOCAL_TRANSPORTS):
        return True
    match = re.match(r"^tcp://(.+):([0-9]+|\*)$", bind)
    if not match:
        return False
    host = match.group(1)
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # an interface name or '*': not provably loopback
