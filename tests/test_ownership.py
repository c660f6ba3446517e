"""Issue 30: no message can end, charge or squat a session it does not own.

A live edge (the bundled toy target) over real ZeroMQ sockets: a victim device opens a
v3 session (its id derived from its owner secret) and plays rounds; an attacker on a
second socket sends everything it can name the victim's session with: owners UTF-8
cannot encode, wrong owners, opens of the victim's id (v3 and legacy), closes. Each
gets an error code; afterwards the victim's session is the same object with the same
counters, and its next round is answered. After an edge restart only the owner can
reopen its id.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from conftest import torch_on_one_thread

from covspec.bench.harness.workload import toy_questions
from covspec.protocol.messages import Close, Error, Open, Opened, Result, Verify, decode, encode
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel
from covspec.toy.models import bundled_model_dir

one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)
SURROGATES = "\ud800" * 16          # JSON carries it, UTF-8 cannot encode it


@pytest.fixture(scope="module")
def target():
    return TargetModel.load(bundled_model_dir("target"))


@pytest.fixture(scope="module")
def question():
    return toy_questions(1)[0]


class Peer:
    """A scripted DEALER: send frames, wait for the reply."""

    def __init__(self, address: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def ask(self, frames: list[bytes], timeout_ms: int = 20_000):
        self.socket.send_multipart(frames)
        assert self.socket.poll(timeout_ms), "no reply"
        return decode(self.socket.recv_multipart())

    def silent(self, frames: list[bytes], wait_ms: int = 300) -> bool:
        self.socket.send_multipart(frames)
        return not self.socket.poll(wait_ms)

    def close(self) -> None:
        self.socket.close(linger=0)


def open_frames(target, question, owner: str, session: str | None = None, version: int = 3, seq: int = 0,
                committed=()) -> list[bytes]:
    frames = encode(Open(session=session_id_for(owner), seq=seq, owner=owner, prompt=question.question,
                         image=np.frombuffer(question.image_png, np.uint8), vocab_hash=target.vocab_hash,
                         max_new_tokens=24, committed=np.asarray(committed, np.int32)))
    header = json.loads(frames[0])
    header.update(v=version, session=session if session is not None else header["session"])
    return [json.dumps(header).encode()] + frames[1:]


def with_owner(frames: list[bytes], owner: str) -> list[bytes]:
    header = json.loads(frames[0])
    header["owner"] = owner
    return [json.dumps(header).encode()] + frames[1:]       # ensure_ascii: a lone surrogate travels as \ud800


def snapshot(server: EdgeServer, sid: str) -> tuple:
    session = server._model_thread.sessions[sid]
    return (id(session), list(session.committed), session.last_seq, session.done, session.last_reply,
            session.identity, vars(session.stats).copy(), server.session_count)


def test_messages_from_anyone_but_the_owner_change_nothing(target, question):
    owner = new_owner()
    sid = session_id_for(owner)
    config = ServerConfig(bind="tcp://127.0.0.1:*", idle_timeout_s=60.0)
    with EdgeServer(target, config) as server:
        victim, attacker = Peer(server.address), Peer(server.address)
        try:
            opened = victim.ask(open_frames(target, question, owner))
            assert isinstance(opened, Opened) and opened.session == sid and opened.owner == owner
            first = victim.ask(encode(Verify(session=sid, seq=1, owner=owner, start=1,
                                             tokens=np.asarray([opened.token], np.int32))))
            assert isinstance(first, Result)
            before = snapshot(server, sid)
            chunk = encode(Verify(session=sid, seq=2, owner=owner, start=len(before[1]),
                                  tokens=np.asarray([3, 4], np.int32)))
            attacks = {
                "verify, surrogate owner": (with_owner(chunk, SURROGATES), "bad_field"),
                "close, surrogate owner": (with_owner(encode(Close(session=sid, seq=3, owner=owner)), SURROGATES),
                                           "bad_field"),
                "open, surrogate owner": (with_owner(open_frames(target, question, owner), SURROGATES), "bad_field"),
                "verify, wrong owner": (with_owner(chunk, new_owner()), "not_owner"),
                "close, wrong owner": (with_owner(encode(Close(session=sid, seq=3, owner=owner)), new_owner()),
                                       "not_owner"),
                "open of the victim's id, v3": (open_frames(target, question, new_owner(), session=sid), "bad_field"),
                "open of the victim's id, v2": (open_frames(target, question, new_owner(), session=sid, version=2),
                                                "bad_field"),
                "open of the victim's id, v1, no owner": (
                    with_owner(open_frames(target, question, new_owner(), session=sid, version=1), ""), "bad_field"),
            }
            for name, (frames, code) in attacks.items():
                reply = attacker.ask(frames)
                assert isinstance(reply, Error) and reply.code == code, (name, reply)
                assert reply.session == sid and len(reply.message) > 20, name
                assert snapshot(server, sid) == before, name
            for seq in range(50):                    # issue 30.2: fifty forged verifies charged the victim
                assert attacker.ask(with_owner(encode(Verify(session=sid, seq=100 + seq, owner=owner, start=2,
                                                             tokens=np.asarray([3], np.int32))),
                                               new_owner())).code == "not_owner"
            assert snapshot(server, sid) == before
            # The victim's next round is answered as if nothing happened.
            reply = victim.ask(chunk)
            assert isinstance(reply, Result) and reply.status == "ok" and reply.seq == 2
        finally:
            victim.close()
            attacker.close()


def test_after_a_restart_only_the_owner_reopens_its_id(target, question):
    owner = new_owner()
    sid = session_id_for(owner)
    config = ServerConfig(bind="tcp://127.0.0.1:*", idle_timeout_s=60.0)
    with EdgeServer(target, config) as first:
        victim = Peer(first.address)
        opened = victim.ask(open_frames(target, question, owner))
        victim.close()
    committed = [opened.token]
    with EdgeServer(target, config) as restarted:            # knows no session any more
        victim, squatter = Peer(restarted.address), Peer(restarted.address)
        try:
            for version in (3, 2, 1):
                squat = squatter.ask(open_frames(target, question, new_owner(), session=sid, version=version))
                assert isinstance(squat, Error) and squat.code == "bad_field" and "owner" in squat.message
            assert restarted.session_count == 0
            reopened = victim.ask(open_frames(target, question, owner, seq=5, committed=committed))
            assert isinstance(reopened, Opened) and reopened.session == sid and reopened.position == 1
        finally:
            victim.close()
            squatter.close()


def test_an_older_device_is_served_as_before(target, question):
    """v1/v2 devices keep ids of their choosing and edge-issued owners, in their version."""
    config = ServerConfig(bind="tcp://127.0.0.1:*", idle_timeout_s=60.0)
    with EdgeServer(target, config) as server:
        peer = Peer(server.address)
        try:
            frames = with_owner(open_frames(target, question, new_owner(), session="0123456789abcdef", version=2), "")
            peer.socket.send_multipart(frames)
            assert peer.socket.poll(20_000)
            reply_frames = peer.socket.recv_multipart()
            opened = decode(reply_frames)
            assert isinstance(opened, Opened) and opened.version == 2 and b'"v":2' in reply_frames[0]
            assert len(opened.owner) >= 16                                     # issued by the edge
            assert peer.silent(encode(Close(session="0123456789abcdef", seq=1, owner=opened.owner, version=2)))
            assert server.session_count == 0
        finally:
            peer.close()
