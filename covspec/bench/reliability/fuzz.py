"""Hostile messages for the edge, generated from a seed (``covspec bench reliability``).

``Fuzzer(seed, facts).case(state)`` returns one ``Case``: the frames to send, the class
it belongs to (``CLASSES``), the reply labels the edge may answer with, and the
(session, seq) the reply must carry when the header names them. A label is an
``error`` reply's code (``bad_json``) or another reply's type (``pong``, ``result``,
``opened``). Two classes are answered by design with nothing: ``close`` (the protocol
answers a close only when it refuses it, e.g. ``not_owner``) and ``socket_drop`` (a
frame over the socket's MAXMSGSIZE: ZeroMQ disconnects the peer before the edge ever
sees the message; sent from a throw-away socket).

Each worker also keeps a session of its own (``OwnSession``: opened, verified with
random chunks, closed), so stale chunks, replays, repeats, bad tokens and wrong
owners hit live sessions; ``WorkerState.foreign`` lends other workers' sessions for
ownership attacks, and ``string_fields`` (``reliability.fuzz_strings``) aims hostile
string values at the live victim sessions of ``WorkerState.victims``. The generator never touches a socket and never decides whether
the edge was right; the runner (``covspec.bench.reliability.fuzz_run``) does. The records and
hostile values it draws from live in ``covspec.bench.reliability.hostile``.
"""

from __future__ import annotations

import json

import numpy as np

from covspec.bench.reliability.fuzz_strings import string_field_case
from covspec.bench.reliability.hostile import (ANY_ERROR, BAD_SAMPLING, DIGIT_LIMIT, FIELD_KINDS, HOSTILE_IMAGES,
                                               HUGE_INTS, MAX_HEADER, NO_REPLY, NON_FINITE, QUESTION, WRONG_VALUES,
                                               Case, OwnSession, TargetFacts, WorkerState)
from covspec.protocol.messages import (PROTOCOL_VERSION, Close, Error, Message, Open, Opened, Ping, Pong, Result,
                                       Verify, encode)
from covspec.protocol.ownership import session_id_for

class Fuzzer:
    """Seeded generator of hostile (and some well-formed) messages."""

    def __init__(self, seed: int, facts: TargetFacts):
        self.rng = np.random.default_rng(seed)
        self.facts = facts
        self.image = np.frombuffer(facts.image_png, np.uint8)
        self.classes = [(name, weight, getattr(self, "_" + name)) for name, weight in CLASSES.items()]
        weights = np.array([w for _, w, _ in self.classes], dtype=float)
        self.p = weights / weights.sum()

    def case(self, state: WorkerState) -> Case:
        own = state.own
        if own is not None and own.done:
            return self._own_close(state)
        name, _, make = self.classes[int(self.rng.choice(len(self.classes), p=self.p))]
        case = make(state)
        case.kind = case.kind or name
        return case

    # --- building blocks ---------------------------------------------------------------------

    def _pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def _id(self) -> str:
        return self.rng.bytes(8).hex()

    def _owner(self) -> str:
        return self._id() + self._id()

    def _open(self, state: WorkerState, **fields) -> Open:
        """A v3 open: the session id is the one its owner secret (drawn here unless given) certifies."""
        defaults = {"max_new_tokens": 24, "prompt": QUESTION, "image": self.image, "vocab_hash": self.facts.vocab_hash,
                    "committed": np.zeros(0, np.int32), "owner": self._owner()}
        fields = {**defaults, **fields}
        return Open(session=session_id_for(fields["owner"]), seq=state.next_seq(), **fields)

    def _verify(self, state: WorkerState, session: str = "", tokens=(3,), **fields) -> Verify:
        return Verify(session=session or self._id(), seq=state.next_seq(), tokens=np.asarray(tokens, np.int32),
                      **fields)

    def _any_message(self, state: WorkerState) -> Message:
        return self._pick([lambda: Ping(session=self._id(), seq=state.next_seq()), lambda: self._verify(state),
                           lambda: self._open(state), lambda: Close(session=self._id(), seq=state.next_seq())])()

    @staticmethod
    def _header(message: Message) -> tuple[dict, list[bytes]]:
        frames = encode(message)
        return json.loads(frames[0]), frames[1:]

    @staticmethod
    def _frames(header: dict, arrays: list[bytes]) -> list[bytes]:
        return [json.dumps(header).encode()] + arrays

    def _case(self, message: Message, expect, kind: str = "", **extra) -> Case:
        return Case(kind, encode(message), frozenset(expect), (message.session, message.seq), **extra)

    def _token_chunk(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(0, self.facts.vocab_size, n)]

    # --- classes -----------------------------------------------------------------------------

    def _random_bytes(self, state):
        frames = [self.rng.bytes(int(self.rng.integers(0, 300))) for _ in range(int(self.rng.integers(1, 4)))]
        return Case("", frames, frozenset([ANY_ERROR]))

    def _malformed_json(self, state):
        raw = encode(self._any_message(state))
        header, rest = raw[0], raw[1:]
        variant = int(self.rng.integers(5))
        if variant == 0:
            header = header[:int(self.rng.integers(0, len(header)))]
        elif variant == 1:
            header = self._pick([b"[1,2]", b'"ping"', b"42", b"null", b"true", b"{}x", b"{'v': 1}"])
        elif variant == 2:
            at = int(self.rng.integers(0, len(header)))
            header = header[:at] + self._pick([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + header[at:]
        elif variant == 3:
            header = header + b"}" + self.rng.bytes(3)
        else:
            return Case("", [header.replace(b'"seq":', b'"seq":' + self._pick(NON_FINITE) + b",\"x\":")] + rest,
                        frozenset(["bad_field", "bad_json"]))
        return Case("", [header] + rest, frozenset(["bad_json"]))

    def _deep_nesting(self, state):
        depth = int(self._pick([9, 12, 100, 1000, 30_000, 40_000]))
        kind = int(self.rng.integers(4))
        opening, closing = (b"[", b"]") if kind % 2 else (b'{"a":', b"}")
        nested = opening * depth + b"1" + closing * depth if kind < 2 else opening * depth
        if kind == 3:                                      # brackets inside a string do not nest
            nested, depth = b'"' + b"[" * depth + b'"', 0
        seq = state.next_seq()
        session = self._id()
        frame = b'{"v":1,"type":"ping","session":"%s","seq":%d,"x":%s}' % (session.encode(), seq, nested)
        if len(frame) > MAX_HEADER:
            return Case("", [frame], frozenset(["too_large"]))
        return Case("", [frame], frozenset(["bad_json"] if depth > 7 else ["bad_field"]),   # a ping has no "x"
                    None if depth > 7 else (session, seq))

    def _huge_ints(self, state):
        message = self._pick([lambda: self._verify(state), lambda: self._open(state),
                              lambda: Ping(session=self._id(), seq=state.next_seq())])()
        header, arrays = self._header(message)
        name = self._pick([k for k in header if FIELD_KINDS.get(k) == "int"])
        value = self._pick(HUGE_INTS)
        header[name] = "HUGE"
        frames = self._frames(header, arrays)
        frames[0] = frames[0].replace(b'"HUGE"', value)
        return Case("", frames, frozenset(["bad_json" if len(value.lstrip(b"-")) > DIGIT_LIMIT else "bad_field"]))

    def _wrong_types(self, state):
        message = self._any_message(state)
        header, arrays = self._header(message)
        name = self._pick(list(header))
        if self.rng.random() < 0.2 and name not in ("arrays",):
            del header[name]
            expect = {"v": "bad_version", "type": "unknown_type"}.get(name, "missing_field")
        elif name == "v":
            header[name], expect = self._pick(["1", PROTOCOL_VERSION + 1, 0, -1, None, [1], True, 1.0, 3.0]), \
                "bad_version"                               # (4 was one before protocol v4 made it valid)
        elif name == "type":
            header[name], expect = self._pick([["ping"], {"a": 1}, 5, None, "PING", "open "]), "unknown_type"
        elif name == "arrays":
            header[name] = self._pick([{"name": "tokens"}, "tokens", 3, None, [1], [None], [["tokens"]]])
            expect = "bad_field" if not isinstance(header[name], list) else "bad_array"
        else:
            header[name], expect = self._pick(WRONG_VALUES[FIELD_KINDS[name]]), "bad_field"
        return Case("", self._frames(header, arrays), frozenset([expect]))

    def _bad_arrays(self, state):
        if self.rng.random() < 0.7:
            header, arrays = self._header(self._verify(state, tokens=self._token_chunk(3)))
        else:
            header, arrays = self._header(self._open(state, committed=np.asarray([4, 5], np.int32)))
        spec = header["arrays"][int(self.rng.integers(len(header["arrays"])))]
        variant = int(self.rng.integers(9))
        expect = "bad_array"
        if variant == 0:
            spec["dtype"] = self._pick(["float32", "int64", "<i4", "O", "object", None, 5, "uint8 "])
        elif variant == 1:
            spec["shape"] = self._pick([[1, 1], [], [[3]], [3, 1, 1]])
        elif variant == 2:
            spec["shape"] = [self._pick([-1, 1.5, "3", True, None, -(2 ** 70)])]
        elif variant == 3:
            spec["name"] = self._pick(["q_bogus", "image ", "", None, 7])
        elif variant == 4:
            header["arrays"].append(dict(spec))
            arrays = arrays + [arrays[0]]
        elif variant == 5:
            arrays = [a + b"\0" * int(self.rng.integers(1, 9)) if i == 0 else a for i, a in enumerate(arrays)]
        elif variant == 6:
            arrays = [a[: len(a) // 2] for a in arrays]
        elif variant == 7:
            header, arrays = self._header(self._verify(state, tokens=[3]))
            header["arrays"] += [{"name": "q_ids", "dtype": "int32", "shape": [1, 2]},
                                 {"name": "q_probs", "dtype": "float16", "shape": [1, 3]}]
            arrays += [b"\0" * 8, b"\0" * 6]
            expect = "bad_field"
        else:
            header, arrays = self._header(self._verify(state, tokens=[3]))
            header["arrays"][0]["shape"], arrays = [0], [b""]
            expect = "bad_field"
        return Case("", self._frames(header, arrays), frozenset([expect]))

    def _overflowing_shapes(self, state):
        header, arrays = self._header(self._verify(state, tokens=[3]))
        shape = self._pick([[2 ** 32, 2 ** 32], [2 ** 64, 1], [10 ** 30, 2], [2 ** 62, 4], [2 ** 31, 2 ** 33],
                            [0, 2 ** 64], [1 << 40, 1 << 40]])
        if self.rng.random() < 0.5:
            header["arrays"].append({"name": "q_ids", "dtype": "int32", "shape": shape})
            arrays = arrays + [b""]
        else:
            header["arrays"][0]["shape"] = [max(shape[0], 1) * shape[1] + 1]
        return Case("", self._frames(header, arrays), frozenset(["too_large"]))

    def _frame_counts(self, state):
        message = self._pick([lambda: self._verify(state, tokens=[3, 4]),
                              lambda: self._open(state, committed=np.asarray([4], np.int32))])()
        frames = encode(message)
        if self.rng.random() < 0.5:
            frames = frames[:-int(self.rng.integers(1, len(frames)))]
            return Case("", frames, frozenset(["missing_frames"]))
        frames = frames + [self.rng.bytes(int(self.rng.integers(0, 20))) for _ in range(int(self.rng.integers(1, 40)))]
        return Case("", frames, frozenset(["extra_frames"]))

    def _oversized(self, state):
        variant = int(self.rng.integers(3))
        if variant == 0:                                     # a header over the header limit
            header, arrays = self._header(self._open(state))
            header["prompt"] = "a" * (MAX_HEADER + 10)
            return Case("", self._frames(header, arrays), frozenset(["too_large"]))
        limit = self.facts.max_message_bytes
        if variant == 1:                                     # frames under the socket limit, too much in all
            frames = [b'{"v":1}', b"\0" * (limit // 2 + 1), b"\0" * (limit // 2 + 1)]
            return Case("", frames, frozenset(["too_large"]))
        message = self._open(state)
        frames = encode(message)
        return Case("socket_drop", [frames[0], b"\0" * (limit + 1)] + frames[2:], frozenset([NO_REPLY]),
                    fresh_socket=True)

    def _bad_tokens(self, state):
        own = state.own
        bad = self._pick([self.facts.vocab_size, self.facts.vocab_size + 1000, 2 ** 31 - 1, -1, -(2 ** 31)])
        if own is not None and self.rng.random() < 0.7:
            tokens = self._token_chunk(int(self.rng.integers(0, 3))) + [bad]
            fields = self._q_fields(tokens, own)
            if own.sampling and own.wire == "compact" and self.rng.random() < 0.5:
                tokens, fields["q_ids"][0, 0] = tokens[:-1] or [3], bad
                fields = {k: v[:len(tokens)] for k, v in fields.items()}
            message = self._verify(state, own.id, tokens, owner=own.owner, start=own.committed, **fields)
            return self._case(message, ["bad_token", "unknown_session"])
        if self.rng.random() < 0.7:
            return self._case(self._open(state, committed=np.asarray([3, bad], np.int32)), ["bad_token"])
        keep = np.asarray([self._pick([-1, 10 ** 6, 2 ** 31 - 1])], np.int32)
        return self._case(self._open(state, target_keep=keep), ["bad_field"])

    def _bad_sampling(self, state):
        name, value = self._pick(BAD_SAMPLING)
        header, arrays = self._header(self._open(state))
        header[name] = value
        if name != "mode" and self.rng.random() < 0.3:
            header["mode"] = "target_only"
        return Case("", self._frames(header, arrays), frozenset(["bad_field"]))

    def _wrong_owner(self, state):
        victim = state.foreign(self.rng)
        if victim is None:
            return self._case(self._verify(state, tokens=[3]), ["unknown_session"], kind="wrong_owner")
        owner = self._pick(["", self._id() + self._id(), victim.owner[:-1] + ("A" if victim.owner[-1] != "A" else "B")])
        variant = int(self.rng.integers(3))
        if variant == 0:
            message = self._verify(state, victim.id, self._token_chunk(2), owner=owner, start=victim.committed)
            return self._case(message, ["not_owner", "unknown_session"])
        if variant == 1:     # an open of the victim's id with another owner (v3: the id is not that owner's)
            header, arrays = self._header(self._open(state))
            header.update(session=victim.id, owner=owner)
            return Case("", self._frames(header, arrays), frozenset(["bad_field"]), (victim.id, header["seq"]))
        return self._case(Close(session=victim.id, seq=state.next_seq(), owner=owner), ["not_owner", NO_REPLY],
                          kind="close")

    def _string_fields(self, state):
        return string_field_case(self, state)

    def _replay(self, state):
        own = state.own
        if own is None or own.last_seq < 2:
            return self._own_traffic(state)
        seq = int(self.rng.integers(0, own.last_seq))
        message = Verify(session=own.id, seq=seq, owner=own.owner, start=own.committed,
                         tokens=np.asarray([3], np.int32))
        return self._case(message, ["replayed", "unknown_session"])

    def _repeat(self, state):
        own = state.own
        if own is None:
            return self._own_traffic(state)
        message = Verify(session=own.id, seq=own.last_seq, owner=own.owner, start=own.committed,
                         tokens=np.asarray(self._token_chunk(2), np.int32))
        return self._case(message, ["result", "opened", "unknown_session"])

    def _stale_chunk(self, state):
        own = state.own
        if own is None:
            return self._own_traffic(state)
        tokens = self._token_chunk(int(self.rng.integers(1, 4)))
        if self.rng.random() < 0.5 or own.last_token < 0:
            start, assumed = own.committed + self._pick([-3, -1, 1, 2, 1000]), -1
        else:
            start, assumed = own.committed, (own.last_token + 1 + int(self.rng.integers(self.facts.vocab_size - 1))) \
                % self.facts.vocab_size
        message = self._verify(state, own.id, tokens, owner=own.owner, start=max(start, 0), assumed=assumed,
                               **self._q_fields(tokens, own))
        return self._case(message, ["result", "unknown_session"], role="verify", tokens=tokens)

    def _unknown_session(self, state):
        session = self._pick([self._id(), "", "é" * 64, "\u0000x", "a" * 64])
        if self.rng.random() < 0.2:
            header, arrays = self._header(self._verify(state))
            header["session"] = "s" * 65
            return Case("", self._frames(header, arrays), frozenset(["bad_field"]))
        return self._case(self._verify(state, session, owner=self._pick(["", self._id() * 2])), ["unknown_session"])

    def _bad_images(self, state):
        message = self._open(state)
        message.image = np.frombuffer(self._pick(HOSTILE_IMAGES), np.uint8)
        return self._case(message, ["bad_image"])

    def _edge_only_types(self, state):
        session, seq = self._id(), state.next_seq()
        message = self._pick([Opened(session=session, seq=seq, owner="x" * 16, token=3),
                              Result(session=session, seq=seq, accepted=1, token=4),
                              Error(session=session, seq=seq, code="busy", message="no"),
                              Pong(session=session, seq=seq, sessions=-1)])
        return self._case(message, ["unexpected_type"])

    def _versions_and_types(self, state):
        header, arrays = self._header(self._any_message(state))
        if self.rng.random() < 0.5:
            header["v"] = self._pick([0, 5, 99, -1, 2 ** 40, "v1", True, 1.0, 3.0])
            return Case("", self._frames(header, arrays), frozenset(["bad_version"]))
        header["type"] = self._pick(["hello", "", "Open", "ping\u0000", "verify2", "x" * 1000, "__class__"])
        return Case("", self._frames(header, arrays), frozenset(["unknown_type"]))

    def _pings(self, state):
        seq = int(self.rng.integers(-(2 ** 63), 2 ** 63 - 1)) if self.rng.random() < 0.3 else state.next_seq()
        return self._case(Ping(session=self._pick([self._id(), "", "é" * 64]), seq=seq), ["pong"])

    def _closes(self, state):
        return self._case(Close(session=self._id(), seq=state.next_seq(), owner=self._pick(["", self._id() * 2])),
                          [NO_REPLY], kind="close")

    def _open_refusals(self, state):
        variant = int(self.rng.integers(3))
        if variant == 0:
            return self._case(self._open(state, vocab_hash=self._pick(["0" * 64, "", "x"])), ["vocab_mismatch"])
        if variant == 1:
            return self._case(self._open(state, prompt=self._pick(["<image> what ?", "a <image>"])), ["bad_field"])
        return self._case(self._open(state, max_new_tokens=self._pick([10 ** 6, 2 ** 62])), ["too_long"])

    def _own_traffic(self, state):
        own = state.own
        if own is None:
            sampling, wire = bool(self.rng.random() < 0.4), self._pick(["compact", "compact", "dense"])
            owner = self._owner()
            state.opened += 1
            message = self._open(state, owner=owner, wire=wire,
                                 max_new_tokens=int(self.rng.integers(4, 40)), seed=int(self.rng.integers(2 ** 63)),
                                 temperature=0.8 if sampling else 0.0, top_k=self._pick([0, 5]),
                                 top_p=self._pick([1.0, 0.9]))
            return self._case(message, ["opened", "busy"], kind="own_open", role="open",
                              session=OwnSession(message.session, owner, sampling, wire))
        if self.rng.random() < 0.03:
            return self._own_close(state)
        tokens = self._token_chunk(int(self.rng.integers(1, 5)))
        message = self._verify(state, own.id, tokens, owner=own.owner, start=own.committed,
                               **self._q_fields(tokens, own))
        return self._case(message, ["result", "unknown_session"], kind="own_verify", role="verify", tokens=tokens)

    def _own_close(self, state):
        own = state.own
        return self._case(Close(session=own.id, seq=state.next_seq(), owner=own.owner), [NO_REPLY],
                          kind="close", role="close")

    def _q_fields(self, tokens: list[int], own: OwnSession) -> dict:
        """The q a well-formed chunk of ``own`` carries: none (compact greedy), sparse, or dense."""
        n, v = len(tokens), self.facts.vocab_size
        if own.wire == "dense":
            return {"q_dense": (self.rng.random((n, v)) + 0.01).astype(np.float16)}
        if not own.sampling:
            return {}
        ids = np.stack([np.concatenate([[t], self.rng.choice([i for i in range(v) if i != t], 2, replace=False)])
                        for t in tokens]).astype(np.int32)
        return {"q_ids": ids, "q_probs": np.full(ids.shape, 1 / 3, np.float16)}


# Relative weights of each class in the stream (own-session traffic keeps live sessions busy).
CLASSES = {"random_bytes": 6, "malformed_json": 6, "deep_nesting": 4, "huge_ints": 6, "wrong_types": 9,
           "bad_arrays": 8, "overflowing_shapes": 5, "frame_counts": 5, "oversized": 0.06, "bad_tokens": 6,
           "bad_sampling": 6, "wrong_owner": 6, "replay": 3, "repeat": 2, "stale_chunk": 4, "unknown_session": 5,
           "bad_images": 3, "edge_only_types": 2, "versions_and_types": 3, "pings": 3, "closes": 2,
           "open_refusals": 0.5, "own_traffic": 8, "string_fields": 9}
