"""Protocol v4: one dataclass per wire message, encoded to and decoded from ZeroMQ frames.

A message is a list of frames. Frame 0 is a UTF-8 JSON header::

    {"v": 3, "type": "verify", "session": "...", "seq": 3, <scalar fields>,
     "arrays": [{"name": "tokens", "dtype": "int32", "shape": [4]}, ...]}

and each array listed in ``arrays`` follows as its own raw little-endian frame, in
that order. Positions count generated tokens only (0 = the first generated token).

``decode`` validates everything (JSON, version, type, every field's presence and
strict type, in a request no field its type and version lack, each array's dtype,
rank and byte length, size limits, frame count) and raises one typed error, ``ProtocolError``,
whose ``code`` names the class of problem and whose message names the field. A
message that decodes is well-formed down to its strings (valid Unicode) and owner
(within ``MAX_OWNER``), so nothing later can fail on its form. A reply (from the edge)
may carry fields this side does not know, which are ignored: an edge may add optional
counters (``counter``) without breaking older devices. Nothing is ever unpickled or
evaluated.

Versions: v2 added the ``edge_led`` mode of ``open`` and ``pong``'s counters (fields
marked ``since(2)``, ``covspec.protocol.fields``); v3 made session ids self-certifying
(``covspec.protocol.ownership``): a v3 ``open`` carries the device's owner secret and
names the session ``session_id_for(owner)``. An open naming an id of that form must
carry its owner in every version, so no v1/v2 device can take a v3 device's id. v4 added
conversations (``open``'s ``conversation`` and ``history``). Every version decodes; a
decoded message remembers its ``version`` and a reply is encoded in the version of its
request, without the fields the older version lacks, so older devices are served as
before. A v1 message asking for what only v2 has (``edge_led``) is refused with
``bad_field``. PROTOCOL.md describes the messages and the modes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from covspec.protocol import errors
from covspec.protocol import history as history_wire
from covspec.protocol.fields import array_field, counter, flag, since
from covspec.protocol.frames import Limits, ProtocolError, is_int, parse_header, read_array, require, scalar
from covspec.protocol.ownership import certifies, derived_form
from covspec.protocol.sampling import SamplingParams
from covspec.protocol.wire import CODECS

PROTOCOL_VERSION = 4
SUPPORTED_VERSIONS = (1, 2, 3, 4)
MODES = ("speculative", "target_only", "edge_led")
MAX_SESSION_ID = 64
MIN_OWNER, MAX_OWNER = 16, 64             # characters of a session's owner secret
SEED_RANGE = (0, 2 ** 64)


@dataclass(kw_only=True)
class Message:
    """Base of every wire message: ``session`` names the session, ``seq`` the round."""

    TYPE: ClassVar[str] = ""
    session: str
    seq: int
    version: int = field(default=PROTOCOL_VERSION, repr=False, compare=False)   # the header's "v"

    def check(self) -> None:
        """Cross-field checks beyond types; raises ProtocolError. Overridden per message."""


@dataclass(kw_only=True)
class Open(Message):
    """Device -> edge: start (or reopen) a session.

    ``committed`` holds every token already committed, so a restarted edge can rebuild
    the exact state; it is empty on a first open. ``owner`` is empty on a first open (the
    edge issues one) or a secret of the device's own choosing (at least ``MIN_OWNER``
    random characters); a reopen sends the session's secret (an edge that no longer knows
    the session adopts it; one that does refuses any other). ``temperature`` 0 means
    greedy; ``top_k`` 0 and ``top_p`` 1.0 mean no truncation. ``mode`` is ``speculative``
    (the device drafts, the target waits for its chunks), ``target_only`` (the edge
    generates and streams) or, from v2, ``edge_led`` (the edge generates and streams by
    itself and verifies the device's chunks as they come). ``wire`` names the wire format
    (``covspec.protocol.wire``). ``target_keep`` (opt-in, NOT exact) lists the visual
    tokens the target keeps too. From v4, ``conversation`` keeps the session after its
    answer for a follow-up question, which opens the same session with the earlier turns
    (``history``, ``covspec.protocol.history``) and may leave ``image`` empty while the
    edge holds it (else ``expired``).
    """

    TYPE: ClassVar[str] = "open"
    prompt: str = ""
    image: np.ndarray = array_field("uint8", 1)
    max_new_tokens: int = 64
    vocab_hash: str = ""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    mode: str = "speculative"
    wire: str = "compact"
    owner: str = ""
    committed: np.ndarray = array_field("int32", 1)
    target_keep: np.ndarray | None = array_field("int32", 1, optional=True)
    history: np.ndarray | None = array_field("uint8", 1, optional=True, since=4)
    history_sizes: np.ndarray | None = array_field("int32", 1, optional=True, since=4)
    conversation: bool = flag(4)

    def check(self) -> None:
        require(self.target_keep is None or self.target_keep.size > 0, errors.BAD_FIELD, "target_keep is empty")
        history_wire.check(self.history, self.history_sizes)
        require(self.max_new_tokens >= 1, errors.BAD_FIELD, "max_new_tokens must be >= 1")
        for problem in self.sampling.problems():
            raise ProtocolError(errors.BAD_FIELD, problem)
        require(self.mode in MODES, errors.BAD_FIELD, f"mode must be one of {', '.join(MODES)}")
        require(self.mode != "edge_led" or self.version >= 2, errors.BAD_FIELD,
                "mode 'edge_led' needs protocol v2; this message is v1")
        require(self.wire in CODECS, errors.BAD_FIELD, f"wire must be one of {', '.join(CODECS)}")
        require(self.image.size > 0 or self.history is not None, errors.BAD_FIELD,
                "image is empty (only a follow-up turn, with history, may leave it out)")
        require(self.owner != "" or self.version < 3, errors.BAD_FIELD,
                "a v3 open carries the device's owner secret (the session id is derived from it); "
                "see covspec.protocol.ownership")
        require(self.owner == "" or len(self.owner) >= MIN_OWNER, errors.BAD_FIELD,
                 f"owner must be empty (the edge issues one) or at least {MIN_OWNER} random characters")
        require(not (self.version >= 3 or derived_form(self.session)) or certifies(self.owner, self.session),
                errors.BAD_FIELD, f"session id {self.session!r} is not derived from this open's owner secret; "
                "name the session session_id_for(owner) (covspec.protocol.ownership), or pick another owner")
        require(SEED_RANGE[0] <= self.seed < SEED_RANGE[1], errors.BAD_FIELD,
                 "seed must be an unsigned 64-bit integer (0 <= seed < 2**64)")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def turns(self) -> list[tuple[str, str]]:
        """The earlier turns of the conversation, (question, answer) pairs ([] on a first question)."""
        return history_wire.decode(self.history, self.history_sizes)


@dataclass(kw_only=True)
class Opened(Message):
    """Edge -> device: the session is ready; ``token`` is the next generated token
    (the first one on a fresh open) at position ``position``; ``done`` when the
    edge stopped (EOS or max_new_tokens). ``owner`` is the session's secret: every
    later message of the session must carry it (else ``not_owner``)."""

    TYPE: ClassVar[str] = "opened"
    owner: str = ""
    token: int = -1
    position: int = 0
    done: bool = False
    prefill_ms: float = 0.0
    context_len: int = 0


@dataclass(kw_only=True)
class Verify(Message):
    """Device -> edge: a draft chunk starting at generated position ``start``.

    ``assumed`` is the token the device assumed at ``start - 1`` (-1: none, the
    chunk follows the last verdict). ``device_leads`` (an ``edge_led`` session only)
    hands the lead to the device: from this chunk on the edge stops stepping by itself
    and the session runs as ``speculative``. What travels beside the ids is the wire
    format's (``covspec.protocol.wire``): on the compact wire, sampling mode sends the
    draft's sparse proposal per position (``q_ids``, ``q_probs``: [n, k]) and greedy
    mode ids only; the dense wire sends the full distribution ``q_dense`` [n, V].
    """

    TYPE: ClassVar[str] = "verify"
    owner: str = ""
    start: int = 0
    assumed: int = -1
    tokens: np.ndarray = array_field("int32", 1)
    q_ids: np.ndarray | None = array_field("int32", 2, optional=True)
    q_probs: np.ndarray | None = array_field("float16", 2, optional=True)
    q_dense: np.ndarray | None = array_field("float16", 2, optional=True)
    device_leads: bool = flag(3)

    def check(self) -> None:
        n = self.tokens.shape[0]
        require(n >= 1, errors.BAD_FIELD, "tokens is empty")
        require(self.start >= 0, errors.BAD_FIELD, "start must be >= 0")
        require((self.q_ids is None) == (self.q_probs is None), errors.BAD_FIELD,
                 "q_ids and q_probs come together")
        if self.q_ids is not None:
            require(self.q_ids.shape == self.q_probs.shape and self.q_ids.shape[0] == n,
                     errors.BAD_FIELD, f"q_ids/q_probs must both be [{n}, k]")
        if self.q_dense is not None:
            require(self.q_dense.shape[0] == n, errors.BAD_FIELD, f"q_dense must be [{n}, V]")


@dataclass(kw_only=True)
class Result(Message):
    """Edge -> device: the verdict on the chunk that started at ``start``.

    ``status`` is ``ok`` or ``stale`` (the chunk's start/assumed token did not match
    the committed sequence; nothing was committed). On ``ok``, ``accepted`` draft
    tokens were kept and ``token`` is the correction (first rejection) or the bonus
    (all accepted); -1 when the edge stopped before it. ``done`` means generation
    ended (EOS committed or max_new_tokens reached). ``verify_ms`` is the edge's
    compute time. The dense wire also returns the target distribution ``p_dense``
    [V] where ``token`` was drawn, beside the sampled ``token``.
    In target-only mode each generated token arrives as a Result with
    ``accepted`` = 0.
    """

    TYPE: ClassVar[str] = "result"
    start: int = 0
    status: str = "ok"
    accepted: int = 0
    token: int = -1
    done: bool = False
    verify_ms: float = 0.0
    p_dense: np.ndarray | None = array_field("float16", 1, optional=True)

    def check(self) -> None:
        require(self.status in ("ok", "stale"), errors.BAD_FIELD, "status must be 'ok' or 'stale'")
        require(self.accepted >= 0, errors.BAD_FIELD, "accepted must be >= 0")


@dataclass(kw_only=True)
class Close(Message):
    """Device -> edge: the session is over; the edge frees its state. No reply (but
    an ``error`` when ``owner`` is not the session's)."""

    TYPE: ClassVar[str] = "close"
    owner: str = ""


@dataclass(kw_only=True)
class Error(Message):
    """Edge -> device: a request could not be served. ``code`` is machine-readable,
    ``message`` a sentence for a person."""

    TYPE: ClassVar[str] = "error"
    code: str = ""
    message: str = ""


@dataclass(kw_only=True)
class Ping(Message):
    """Device -> edge: liveness probe."""

    TYPE: ClassVar[str] = "ping"


@dataclass(kw_only=True)
class Pong(Message):
    """Edge -> device: answer to a ping, with the number of live sessions and the
    edge's counters since it started: target ``forwards`` (prefills included),
    ``committed`` tokens over all sessions, milliseconds spent opening sessions
    (``prefill_ms``) and running rounds (``rounds_ms``), ``peak_bytes`` of memory (the
    CUDA allocator's peak on a GPU, else the process's peak resident set). Under a
    deployment regime (``covspec edge serve --regime``), ``overruns`` counts the target
    forwards whose real compute took longer than the regime's emulated time, and
    ``overrun_ms`` the time beyond it. The prefix cache's ``prefix_hits``, ``prefix_misses``
    and ``prefix_evictions`` count opens that started from a cached prefix, opens that
    found none (and prefilled fresh), and entries evicted; ``prefix_bytes`` is what it
    holds now; ``turns_continued`` counts follow-up questions that continued their session's
    own cache; ``kv_bytes`` is the live sessions' KV as ``--kv-budget`` counts it (all optional:
    an edge that predates them sends none; 0 with the cache off)."""

    TYPE: ClassVar[str] = "pong"
    sessions: int = 0
    forwards: int = since(2, 0)
    committed: int = since(2, 0)
    prefill_ms: int = since(2, 0)
    rounds_ms: int = since(2, 0)
    peak_bytes: int = since(2, 0)
    overruns: int = counter(2)
    overrun_ms: int = counter(2)
    prefix_hits: int = counter(2)
    prefix_misses: int = counter(2)
    prefix_evictions: int = counter(2)
    prefix_bytes: int = counter(2)
    turns_continued: int = counter(2)
    kv_bytes: int = counter(2)


REQUEST_TYPES = ("open", "verify", "close", "ping")     # what a device sends: no field beyond its type's
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Open, Opened, Verify, Result, Close, Error, Ping, Pong)}

# Field annotations are strings (postponed evaluation); scalar fields use these names.
_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool}


def _fields(cls: type[Message], version: int = PROTOCOL_VERSION) -> list[dataclasses.Field]:
    """The fields of ``cls`` a ``version`` message carries beside session and seq."""
    return [f for f in dataclasses.fields(cls) if f.name not in ("session", "seq", "version")
            and f.metadata.get("since", 1) <= version]


def encode(message: Message) -> list[bytes]:
    """The frames of ``message``: JSON header, then one raw little-endian frame per array."""
    message.check()
    header: dict[str, Any] = {"v": message.version, "type": message.TYPE,
                              "session": message.session, "seq": int(message.seq)}
    arrays: list[dict[str, Any]] = []
    frames: list[bytes] = []
    for f in _fields(type(message), message.version):
        value = getattr(message, f.name)
        if f.metadata.get("array"):
            if value is None:
                continue
            array = np.ascontiguousarray(value, dtype=np.dtype(f.metadata["dtype"]).newbyteorder("<"))
            if array.ndim != f.metadata["ndim"]:
                raise ProtocolError(errors.BAD_ARRAY, f"{f.name} must have {f.metadata['ndim']} dimensions")
            arrays.append({"name": f.name, "dtype": f.metadata["dtype"], "shape": list(array.shape)})
            frames.append(array.tobytes())
        elif not (f.metadata.get("optional") and value == f.default):     # an optional field at its default is left out
            header[f.name] = value
    header["arrays"] = arrays
    return [json.dumps(header, separators=(",", ":")).encode("utf-8")] + frames


def decode(frames: list[bytes], limits: Limits = Limits()) -> Message:
    """Validate ``frames`` and build the message; raise ProtocolError on any problem."""
    require(len(frames) >= 1, errors.MISSING_FRAMES, "a message needs at least a header frame")
    total = sum(len(f) for f in frames)
    require(total <= limits.max_message_bytes, errors.TOO_LARGE,
             f"message is {total} bytes; the limit is {limits.max_message_bytes}")
    header = parse_header(frames[0], limits)
    version = header.get("v")
    require(is_int(version) and version in SUPPORTED_VERSIONS, errors.BAD_VERSION,
            f"protocol version {version!a} is not supported; this side speaks "
            f"{' and '.join(f'v{v}' for v in SUPPORTED_VERSIONS)}: update covspec on the older side")
    kind = header.get("type")
    require(isinstance(kind, str) and kind in MESSAGE_TYPES, errors.UNKNOWN_TYPE,
             f"message type {kind!a} is unknown; expected one of {sorted(MESSAGE_TYPES)}")
    cls = MESSAGE_TYPES[kind]
    values: dict[str, Any] = {
        "session": scalar(header, "session", str),
        "seq": scalar(header, "seq", int), "version": version}
    require(len(values["session"]) <= MAX_SESSION_ID, errors.BAD_FIELD,
             f"session id is longer than {MAX_SESSION_ID} characters")

    declared = _array_specs(header, cls, version)
    require(len(frames) - 1 == len(declared), errors.EXTRA_FRAMES if len(frames) - 1 > len(declared)
             else errors.MISSING_FRAMES, f"header declares {len(declared)} arrays but {len(frames) - 1} frames follow")
    fields = _fields(cls, version)
    known = {"v", "type", "session", "seq", "arrays"} | {f.name for f in fields if not f.metadata.get("array")}
    unknown = sorted(str(name) for name in header if name not in known)
    if unknown and kind in REQUEST_TYPES:
        raise ProtocolError(errors.BAD_FIELD, f"a v{version} {kind} has no field {unknown[0]!a}; "
                                              f"its fields are {', '.join(sorted(known))}")
    for f in fields:
        if f.metadata.get("array") or (f.metadata.get("optional") and f.name not in header):
            continue
        values[f.name] = scalar(header, f.name, _TYPE_NAMES[f.type])
    require(len(values.get("owner", "")) <= MAX_OWNER, errors.BAD_FIELD,
             f"owner is longer than {MAX_OWNER} characters")
    for (name, spec), frame in zip(declared.items(), frames[1:]):
        values[name] = read_array(name, spec, bytes(frame), limits)
    for f in _fields(cls):
        if f.metadata.get("array") and f.default is dataclasses.MISSING and f.name not in values:
            raise ProtocolError(errors.MISSING_FIELD, f"{kind} needs the array {f.name!r}")
    message = cls(**values)
    message.check()
    return message


def _array_specs(header: dict, cls: type[Message], version: int) -> dict[str, dict]:
    specs = header.get("arrays", [])
    require(isinstance(specs, list), errors.BAD_FIELD, "'arrays' must be a list")
    allowed = {f.name: f.metadata for f in _fields(cls, version) if f.metadata.get("array")}
    declared: dict[str, dict] = {}
    for spec in specs:
        require(isinstance(spec, dict) and isinstance(spec.get("name"), str), errors.BAD_ARRAY,
                 "each entry of 'arrays' needs a name")
        name = spec["name"]
        require(set(spec) <= {"name", "dtype", "shape"}, errors.BAD_ARRAY,
                f"array {name!a} is declared with keys {sorted(spec)!a}; an array has a name, dtype and shape only")
        require(name in allowed, errors.BAD_ARRAY, f"a v{version} {cls.TYPE} has no array {name!a}")
        require(name not in declared, errors.BAD_ARRAY, f"array {name!a} is declared twice")
        meta = allowed[name]
        require(spec.get("dtype") == meta["dtype"], errors.BAD_ARRAY,
                 f"array {name!a} must be {meta['dtype']}, declared {spec.get('dtype')!a}")
        shape = spec.get("shape")
        require(isinstance(shape, list) and len(shape) == meta["ndim"]
                 and all(is_int(d) and d >= 0 for d in shape),
                 errors.BAD_ARRAY, f"array {name!r} needs a shape of {meta['ndim']} non-negative ints")
        declared[name] = {"dtype": meta["dtype"], "shape": shape}
    return declared
