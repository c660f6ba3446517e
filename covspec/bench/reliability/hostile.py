"""What the fuzzer's cases are made of (``fuzz`` draws them, ``fuzz_run`` sends them).

- ``Case``: one message to send (its frames), its class, the reply labels the edge may
  answer with (an ``error`` reply's code, or another reply's type; ``NO_REPLY`` when
  nothing comes back by design; ``ANY_ERROR`` when any error code will do) and the
  (session, seq) the reply must carry when the header names them;
- ``OwnSession``/``WorkerState``: a fuzzing socket's own live session as it believes the
  edge holds it (updated from every reply), and the sessions of the other sockets, for
  ownership attacks; ``VictimSession``: the sessions hostile string fields aim at;
- the hostile values: images whose headers lie or whose data is broken, integers beyond
  64 bits, wrong JSON types per field, strings UTF-8 cannot encode, meaningless sampling
  settings.

Data only: no socket, no randomness.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from covspec.protocol.messages import Error, Message, Result

ANY_ERROR = "*error"              # in ``Case.expect``: any error code will do
NO_REPLY = "none"                 # in ``Case.expect``: nothing comes back by design
QUESTION = "what color is the circle ?"
MAX_HEADER = 64 * 1024            # the edge's header limit (``messages.Limits``)


@dataclass(frozen=True)
class TargetFacts:
    """What a fuzzer knows about the edge it attacks."""

    vocab_size: int
    vocab_hash: str
    image_png: bytes                   # a small valid image, for opens that must get past the image
    max_message_bytes: int = 16 * 1024 * 1024
    victim_prompt: str = QUESTION      # the victims' question about ``image_png``
    victim_answer: tuple[int, ...] = ()   # the target's greedy answer to it (empty: no victims)


@dataclass
class OwnSession:
    """A worker's own live session, as the worker believes the edge holds it."""

    id: str
    owner: str
    sampling: bool
    wire: str
    committed: int = 0
    last_token: int = -1
    last_seq: int = 0
    done: bool = False

    def observe(self, case: Case, reply: Message | None) -> bool:
        """Update from the reply to ``case``; False when the session is gone."""
        if case.role == "close" or (isinstance(reply, Error) and reply.code == "unknown_session"):
            return False
        if isinstance(reply, Result) and reply.seq > self.last_seq:
            self.last_seq = reply.seq
            if reply.status == "ok":
                kept = case.tokens[:reply.accepted] + ([reply.token] if reply.token >= 0 else [])
                self.committed += len(kept)
                self.last_token = kept[-1] if kept else self.last_token
                self.done = reply.done
        return True


@dataclass
class Case:
    kind: str
    frames: list[bytes]
    expect: frozenset[str]
    address: tuple[str, int] | None = None     # the reply's (session, seq); None: not checked
    role: str = ""                             # own-session traffic: "open", "verify", "close"
    tokens: list[int] = field(default_factory=list)
    fresh_socket: bool = False                 # send from a throw-away socket (the peer gets dropped)
    session: OwnSession | None = None          # role "open": the session it opens


@dataclass(frozen=True)
class VictimSession:
    """A live session that only its owner ever touches (``reliability.victim``)."""

    id: str
    owner: str


class WorkerState:
    """One fuzzing socket's view: its seq counter, its own session, everyone's sessions and victims."""

    def __init__(self, index: int, registry: dict[int, OwnSession], victims: dict[int, VictimSession] | None = None):
        self.index, self.registry = index, registry
        self.victims = {} if victims is None else victims
        self.seq = 0
        self.opened = 0
        self.own: OwnSession | None = None

    def victim(self, rng: np.random.Generator) -> VictimSession | None:
        """A live victim session (any worker's), or None while there is none."""
        live = [v for v in list(self.victims.values()) if v is not None]
        return live[int(rng.integers(len(live)))] if live else None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def foreign(self, rng: np.random.Generator) -> OwnSession | None:
        others = [s for i, s in list(self.registry.items()) if i != self.index and s is not None]
        return others[int(rng.integers(len(others)))] if others else self.own

    def adopt(self, session: OwnSession | None) -> None:
        self.own = session
        self.registry[self.index] = session


def png_claiming(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data: ``idat``, or none)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"") if idat is None else idat)
            + chunk(b"IEND", b""))


HOSTILE_IMAGES = [
    png_claiming(1, 4_000_000), png_claiming(32, 500_000), png_claiming(64, 250_000),
    png_claiming(100_000, 100_000), png_claiming(2 ** 31 - 1, 2 ** 31 - 1), png_claiming(0, 10),
    png_claiming(40, 40), png_claiming(40, 40, b"not zlib" * 8), png_claiming(40, 40, zlib.compress(b"\0" * 99)),
    b"\x89PNG\r\n\x1a\n" + b"x" * 50, b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\xf7\0\0" + b"\0" * 30,
    b"P6\n100000 100000\n255\n", b"P6\n3 3\n255\nabc", b"\xff\xd8\xff\xe0" + b"\0" * 40, b"\0",
    b"BM" + b"\0" * 8 + struct.pack("<IIiiHHI", 54, 40, 1, -(2 ** 31), 1, 24, 0) + b"\0" * 20,
    b"II*\0\x08\0\0\0" + b"\0" * 30, b"<svg xmlns='http://www.w3.org/2000/svg'/>",
]
# Integers beyond 64 bits as JSON text (Python refuses to print those over 4,300 digits).
HUGE_INTS = [str(2 ** 64).encode(), str(2 ** 64 + 1).encode(), str(-(2 ** 63) - 1).encode(), b"1" + b"0" * 20,
             b"-1" + b"0" * 30, b"1" + b"0" * 100, b"9" * 4300, b"9" * 4301, b"1" + b"0" * 5000]
DIGIT_LIMIT = 4300                 # Python's int parsing limit: longer literals are not usable JSON
INVALID_UNICODE = ["\ud800" * 16, "\udfff", "\ud83d", "\udc80" * 3, "a\ud800b", "\ud800\ud800\udfff"]   # lone surrogates
WRONG_TYPES = [5, 0.5, True, None, ["x"], {"x": 1}, [], 0]                    # for a string field
WRONG_VALUES = {"int": ["7", 1.5, 1.0, True, None, [1], {"a": 1}], "float": ["0.5", True, None, [0.5], {}],
                "str": [5, 0.5, True, None, ["x"], {"x": 1}, "\ud800" * 16]}   # a lone surrogate UTF-8 cannot encode
FIELD_KINDS = {"session": "str", "seq": "int", "prompt": "str", "max_new_tokens": "int", "vocab_hash": "str",
               "temperature": "float", "top_k": "int", "top_p": "float", "seed": "int", "mode": "str",
               "wire": "str", "owner": "str", "start": "int", "assumed": "int"}
BAD_SAMPLING = [("temperature", -1.0), ("temperature", 1e-320), ("temperature", 1e-5), ("temperature", 1e308),
                ("temperature", 1e4), ("top_k", -1), ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0000001),
                ("top_p", 2), ("seed", -1), ("seed", 2 ** 64), ("max_new_tokens", 0), ("max_new_tokens", -3),
                ("mode", ""), ("mode", "draft"), ("wire", "sparse"), ("wire", ""), ("owner", "short"),
                ("owner", "x" * 15), ("owner", "y" * 65)]
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" + b"0" * 400]
