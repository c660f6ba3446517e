"""Hostile string fields aimed at a live victim session (issue 30: the fuzzer learns the lesson).

``string_field_case(fuzzer, state)`` draws one message (``open``, ``verify``, ``close`` or
``ping``) that names a live victim session (``WorkerState.victim``: another socket's,
or this one's) and puts a hostile value into one of its string fields (``session``,
``owner``, ``prompt``, ``vocab_hash``, ``mode``, ``wire``): invalid Unicode (lone
surrogates, which JSON carries and UTF-8 cannot encode), empty, huge (beyond the header
limit too), or a value of the wrong JSON type. The owner is the victim's real one now
and then, but only with a value refused at decode (invalid Unicode, a wrong type): the
owner's own malformed message must end nothing either; empty and huge values come with
a wrong owner. No such message may succeed: every one is refused with an error (a ping
may be answered ``pong``; a close may go unanswered), and the victim must still answer
its next round right (``reliability.victim``).

Closes only fuzz ``owner``: their refusal is matched by (session, seq), which must stay
the victim's. Data and randomness only; no socket.
"""

from __future__ import annotations

import numpy as np

from covspec.bench.reliability.hostile import ANY_ERROR, INVALID_UNICODE, MAX_HEADER, NO_REPLY, WRONG_TYPES, Case
from covspec.protocol.messages import Close, Ping, Verify

STRING_FIELDS = {"open": ("session", "owner", "prompt", "vocab_hash", "mode", "wire"), "verify": ("session", "owner"),
                 "close": ("owner",), "ping": ("session",)}
HUGE_LENGTHS = (65, 1_000, 20_000, MAX_HEADER + 100)


def string_field_case(fuzzer, state) -> Case:
    rng = fuzzer.rng
    victim = state.victim(rng)
    if victim is None:
        return fuzzer._own_traffic(state)
    kind = fuzzer._pick(list(STRING_FIELDS))
    name = fuzzer._pick(list(STRING_FIELDS[kind]))
    variant = fuzzer._pick(["unicode", "unicode", "wrong_type", "empty", "huge"])
    if variant == "unicode":
        value = fuzzer._pick(INVALID_UNICODE)
        value = value if rng.random() < 0.5 else victim.id[:8] + value + victim.id[8:]
    elif variant == "wrong_type":
        value = fuzzer._pick(WRONG_TYPES)
    elif variant == "empty":
        value = ""
    else:
        value = "x" * fuzzer._pick([n for n in HUGE_LENGTHS if kind != "close" or n < MAX_HEADER])
    owner = victim.owner if variant in ("unicode", "wrong_type") and rng.random() < 0.3 else \
        fuzzer._pick([fuzzer._owner(), victim.owner[:-1] + ("A" if victim.owner[-1] != "A" else "B")])
    seq = state.next_seq()
    if kind == "open":
        message = fuzzer._open(state)
    elif kind == "verify":
        message = Verify(session=victim.id, seq=seq, owner=owner, start=int(rng.integers(0, 4)),
                         tokens=np.asarray(fuzzer._token_chunk(2), np.int32))
    elif kind == "close":
        message = Close(session=victim.id, seq=seq, owner=owner)
    else:
        message = Ping(session=victim.id, seq=seq)
    header, arrays = fuzzer._header(message)
    header.update(session=victim.id, seq=seq)
    if kind != "ping":
        header["owner"] = owner
    header[name] = value
    expect = {ANY_ERROR} | ({"pong"} if kind == "ping" else set()) | ({NO_REPLY} if kind == "close" else set())
    frames = fuzzer._frames(header, arrays)
    # A header over the limit is refused before it is read: its reply names no session.
    address = (victim.id, seq) if name != "session" and len(frames[0]) <= MAX_HEADER else None
    return Case("string_fields" if kind != "close" else "close", frames, frozenset(expect), address)
