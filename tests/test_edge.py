"""The edge server over real sockets with real (tiny, config-built) models.

A scripted DEALER client drives ``EdgeServer`` exactly as a device would: greedy
rounds must reproduce ``model.generate()`` token for token, sampling must follow
the target distribution, bad requests get the right error code while other
sessions go on, CurveZMQ admits only allowed keys, idle sessions expire.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_on_one_thread
import zmq
from click.testing import CliRunner
from PIL import Image, ImageDraw

from covspec.cli.main import cli
from covspec.families.common import fill_prompt
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol import verification as spec
from covspec.protocol.messages import (Close, Error, Open, Opened, Ping, Pong, Result, Verify, decode, encode)
from covspec.runtime_edge.config import ConfigError, ServerConfig
from covspec.runtime_edge.server import EdgeServer
from covspec.runtime_edge.target import TargetModel

RECV_MS = 20_000
ANY_PORT = "tcp://127.0.0.1:*"
TOY_TARGET = Path(__file__).resolve().parent.parent / "covspec" / "toy" / "models" / "target"
QUESTION = "what color is the circle ?"


# --- helpers -------------------------------------------------------------------------

class Client:
    """A scripted device: one DEALER socket, every receive with a timeout."""

    def __init__(self, address: str, *, curve: tuple[bytes, bytes, bytes] | None = None):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            public, secret, server_public = curve
            self.socket.curve_publickey, self.socket.curve_secretkey = public, secret
            self.socket.curve_serverkey = server_public
        self.socket.connect(address)
        self.owners: dict[str, str] = {}

    def send(self, message) -> None:
        """Send ``message``, with the owner secret of its session when this client opened it
        (as a device does) and the message names none."""
        if getattr(message, "owner", None) == "" and message.session in self.owners:
            message = dataclasses.replace(message, owner=self.owners[message.session])
        self.send_frames(encode(message))

    def send_frames(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout_ms: int = RECV_MS):
        if not self.socket.poll(timeout_ms):
            raise TimeoutError("no reply from the edge")
        reply = decode(self.socket.recv_multipart())
        if isinstance(reply, Opened):
            self.owners[reply.session] = reply.owner
        return reply

    def request(self, message, timeout_ms: int = RECV_MS):
        self.send(message)
        return self.recv(timeout_ms)

    def close(self) -> None:
        self.socket.close(linger=0)


def png(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def noise_image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def open_message(target: TargetModel, session: str, image: Image.Image, **fields) -> Open:
    """An open of ``session`` as a v2 device sends it (an id of its choosing, the owner secret
    issued by the edge unless given); v3's self-certifying ids: tests/test_ownership.py."""
    fields.setdefault("version", 2)
    fields.setdefault("prompt", QUESTION)
    fields.setdefault("max_new_tokens", 16)
    fields.setdefault("vocab_hash", target.vocab_hash)
    return Open(session=session, seq=fields.pop("seq", 0), image=png(image),
                committed=np.asarray(fields.pop("committed", []), np.int32), **fields)


def reference(target: TargetModel, image: Image.Image, max_new_tokens: int, question: str = QUESTION,
              eos: int | None = None) -> list[int]:
    """The target's own greedy output via transformers' generate()."""
    import torch

    prompt = fill_prompt(target.template, question)
    inputs = target.processor(images=image, text=prompt, return_tensors="pt")
    extra = {} if eos is None else {"eos_token_id": eos}
    with torch.inference_mode():
        out = target.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def chunk_for(strategy: str, ref: list[int], position: int, round_: int, vocab: int, width: int = 3) -> list[int]:
    """A draft chunk at ``position``: the target's own tokens, wrong tokens, or a mix."""
    truth = ref[position:position + width] + [5] * width
    wrong = [(t + 1) % vocab for t in truth]
    if strategy == "right":
        chunk = truth
    elif strategy == "wrong":
        chunk = wrong
    else:                                                      # mix: k right then wrong, k varies
        k = round_ % (width + 1)
        chunk = truth[:k] + wrong[k:]
    return chunk[:width]


def drive_greedy(client: Client, target: TargetModel, session: str, image: Image.Image, ref: list[int],
                 strategy: str, max_new_tokens: int, width: int = 3, seq0: int = 0) -> list[int]:
    """Run a whole greedy session with scripted chunks; returns the committed tokens."""
    opened = client.request(open_message(target, session, image, max_new_tokens=max_new_tokens, seq=seq0))
    assert isinstance(opened, Opened), opened
    committed, done, seq = [opened.token], opened.done, seq0
    while not done:
        seq += 1
        chunk = chunk_for(strategy, ref, len(committed), seq, target.vocab_size, width)
        result = client.request(Verify(session=session, seq=seq, start=len(committed),
                                       tokens=np.asarray(chunk, np.int32)))
        assert isinstance(result, Result) and result.status == "ok", result
        truth = ref[len(committed):len(committed) + width]
        if strategy == "right" and not result.done:
            assert result.accepted == width
        if strategy == "wrong":
            assert result.accepted == 0
        committed += chunk[:result.accepted] + ([result.token] if result.token != spec.NO_TOKEN else [])
        assert committed == ref[:len(committed)], (strategy, truth, result)
        done = result.done
    client.send(Close(session=session, seq=seq + 1))
    return committed


# --- fixtures --------------------------------------------------------------------------

one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny") / "target", vocab_size=64, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TargetModel:
    return TargetModel.load(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny):
    with EdgeServer(tiny, ServerConfig(bind=ANY_PORT, max_context=200)) as running:
        yield running


@pytest.fixture
def client(server):
    c = Client(server.address)
    yield c
    c.close()


# --- greedy exactness ---------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["right", "wrong", "mix"])
def test_greedy_rounds_equal_generate(tiny, client, strategy):
    image = noise_image(1)
    ref = reference(tiny, image, 20)
    assert drive_greedy(client, tiny, f"g-{strategy}", image, ref, strategy, 20) == ref


def test_greedy_stops_at_eos_inside_a_chunk(tiny, client, tiny_dir):
    image = noise_image(2)
    plain = reference(tiny, image, 20)
    eos = plain[6]                                   # pretend this token is EOS
    target = TargetModel(tiny.model, tiny.processor, "cpu")
    target.eos_ids = frozenset({eos})
    ref = reference(tiny, image, 20, eos=eos)
    assert ref[-1] == eos and len(ref) < 20
    with EdgeServer(target, ServerConfig(bind=ANY_PORT)) as eos_server:
        c = Client(eos_server.address)
        try:
            assert drive_greedy(c, target, "eos", image, ref, "right", 20, width=4) == ref
        finally:
            c.close()


def test_max_new_tokens_cuts_a_chunk(tiny, client):
    image = noise_image(3)
    ref = reference(tiny, image, 5)
    assert drive_greedy(client, tiny, "cut", image, ref, "right", 5, width=8) == ref


def test_reopen_with_committed_tokens_continues_exactly(tiny, client):
    image = noise_image(4)
    ref = reference(tiny, image, 12)
    opened = client.request(open_message(tiny, "re", image, max_new_tokens=12, committed=ref[:5]))
    assert (opened.token, opened.position, opened.done) == (ref[5], 5, False)
    finished = client.request(open_message(tiny, "re", image, max_new_tokens=12, committed=ref, seq=7))
    assert (finished.token, finished.done) == (spec.NO_TOKEN, True)
    assert client.request(Ping(session="re", seq=8)).sessions >= 1


def test_committed_and_drafted_image_token_ids_are_plain_text(tiny, client):
    """Issue 21, item 8: a generated id equal to the image placeholder is text, not an image slot."""
    image_id = tiny.model.config.image_token_id
    opened = client.request(open_message(tiny, "imgtok", noise_image(3), committed=[image_id, 3]))
    assert isinstance(opened, Opened) and opened.position == 2
    result = client.request(Verify(session="imgtok", seq=1, start=3, tokens=np.asarray([image_id, image_id], np.int32)))
    assert isinstance(result, Result) and result.status == "ok"


def test_pipelined_chunk_on_a_wrong_assumption_is_stale(tiny, client):
    image = noise_image(5)
    ref = reference(tiny, image, 16)
    opened = client.request(open_message(tiny, "pipe", image))
    wrong = (ref[2] + 1) % tiny.vocab_size
    # Chunk 1 proposes ref[1], wrong; chunk 2 is drafted assuming chunk 1 was all accepted.
    client.send(Verify(session="pipe", seq=1, start=1, tokens=np.asarray([ref[1], wrong], np.int32)))
    client.send(Verify(session="pipe", seq=2, start=3, assumed=wrong, tokens=np.asarray([ref[3]], np.int32)))
    first, second = client.recv(), client.recv()
    assert (first.status, first.accepted, first.token) == ("ok", 1, ref[2])
    assert (second.status, second.start) == ("stale", 3)
    # The committed sequence is [ref0, ref1, ref2]; drafting goes on from there.
    third = client.request(Verify(session="pipe", seq=3, start=3, assumed=ref[2], tokens=np.asarray(ref[3:5], np.int32)))
    assert (third.status, third.accepted, third.token) == ("ok", 2, ref[5])
    assert opened.token == ref[0]


def test_device_client_awaits_its_own_reply_past_stale_ones(tiny, server):
    """``EdgeClient.reply_ready(session, seq)`` drops the replies to chunks given up on
    (a verdict already used, a ``stale``) and keeps the awaited one for ``receive``."""
    from covspec.runtime_device.client import EdgeClient

    image = noise_image(6)
    ref = reference(tiny, image, 16)
    device = EdgeClient(server.address)
    try:
        owner = device.request(open_message(tiny, "ready", image)).owner
        wrong = (ref[2] + 1) % tiny.vocab_size
        device.send(Verify(session="ready", seq=1, owner=owner, start=1,
                           tokens=np.asarray([ref[1], wrong], np.int32)))
        device.send(Verify(session="ready", seq=2, owner=owner, start=3, assumed=wrong,
                           tokens=np.asarray([ref[3]], np.int32)))
        device.send(Verify(session="ready", seq=3, owner=owner, start=3, assumed=ref[2],
                           tokens=np.asarray(ref[3:5], np.int32)))
        deadline = time.monotonic() + 10
        while not device.reply_ready("ready", 3):
            assert time.monotonic() < deadline, "no reply to seq 3"
            time.sleep(0.005)
        assert not device.socket.poll(0)            # the replies to seq 1 and 2 were read and dropped
        third = device.receive("ready", 3, timeout_s=0.0)
        assert (third.status, third.accepted, third.token) == ("ok", 2, ref[5])
        assert not device.reply_ready("ready", 4)
    finally:
        device.close()


def test_target_only_streams_generate_and_interleaves(tiny, server):
    image = noise_image(6)
    ref = reference(tiny, image, 60)
    streamer, other = Client(server.address), Client(server.address)
    try:
        # A target-only device tokenizes nothing: it may leave the vocabulary hash empty.
        streamer.send(open_message(tiny, "stream", image, max_new_tokens=60, mode="target_only", vocab_hash=""))
        opened_other = other.request(open_message(tiny, "other", noise_image(7), max_new_tokens=4))
        assert isinstance(opened_other, Opened)
        # Fairness: the other session's open was served while the stream had far to go.
        early = []
        while streamer.socket.poll(0):
            early.append(streamer.recv())
        assert len(early) < 30 and not any(m.done for m in early), len(early)
        tokens, done = [], False
        while not done:
            message = early.pop(0) if early else streamer.recv()
            if isinstance(message, Opened):
                tokens.append(message.token)
                done = message.done
            else:
                assert isinstance(message, Result) and message.start == len(tokens) and message.accepted == 0
                tokens.append(message.token)
                done = message.done
        assert tokens == ref
    finally:
        streamer.close()
        other.close()


# --- sessions belong to whoever opened them (issue 21, item 12) ------------------------------------

def test_a_forger_cannot_take_a_target_only_stream(tiny, server):
    image = noise_image(6)
    ref = reference(tiny, image, 30)
    owner, forger = Client(server.address), Client(server.address)
    try:
        owner.send(open_message(tiny, "owned-stream", image, max_new_tokens=30, mode="target_only", vocab_hash=""))
        forged = forger.request(Verify(session="owned-stream", seq=7, start=1, tokens=np.asarray([3], np.int32)))
        assert isinstance(forged, Error) and forged.code == "not_owner"
        tokens = []
        while len(tokens) < 30:
            message = owner.recv()
            tokens.append(message.token)
        assert tokens == ref                                   # every token still reached the owner
        assert not forger.socket.poll(200)                     # and none the forger
    finally:
        owner.close()
        forger.close()


def test_an_open_with_a_taken_id_is_refused_and_the_owner_is_unharmed(tiny, server):
    image = noise_image(4)
    ref = reference(tiny, image, 12)
    owner, forger = Client(server.address), Client(server.address)
    try:
        assert owner.request(open_message(tiny, "taken", image, max_new_tokens=12)).token == ref[0]
        hijack = forger.request(open_message(tiny, "taken", noise_image(5), max_new_tokens=12))
        assert isinstance(hijack, Error) and hijack.code == "not_owner"
        close = forger.request(Close(session="taken", seq=9, owner="not-the-owner-secret"))
        assert isinstance(close, Error) and close.code == "not_owner"
        result = owner.request(Verify(session="taken", seq=1, start=1, tokens=np.asarray(ref[1:4], np.int32)))
        assert (result.accepted, result.token) == (3, ref[4])
        # The owner itself may reopen (e.g. after losing replies): it proves it with its secret.
        assert isinstance(owner.request(open_message(tiny, "taken", image, max_new_tokens=12, seq=3,
                                                     committed=ref[:5])), Opened)
    finally:
        owner.close()
        forger.close()


# --- toy target on ShapesVQA ------------------------------------------------------------------

def shapes_images() -> list[tuple[Image.Image, str]]:
    try:
        from covspec.toy import shapes
        samples = [shapes.sample("test", i) for i in range(2)]
        return [(s.image(), s.qas[-1].question) for s in samples]     # "describe" when it applies: long answers
    except ImportError:
        images = []
        for i, (color, box) in enumerate([("red", (10, 10, 40, 40)), ("blue", (50, 20, 90, 60))]):
            image = Image.new("RGB", (96, 96), (24, 24, 24))
            ImageDraw.Draw(image).ellipse(box, fill=color)
            images.append((image, "how many shapes are there ?"))
        return images


@pytest.mark.skipif(not (TOY_TARGET / "config.json").is_file(), reason="the toy target is not trained yet")
def test_toy_target_greedy_equals_generate():
    target = TargetModel.load(TOY_TARGET)
    with EdgeServer(target, ServerConfig(bind=ANY_PORT)) as toy_server:
        c = Client(toy_server.address)
        try:
            for i, (image, question) in enumerate(shapes_images()):
                ref = reference(target, image, 24, question=question)
                for strategy in ("right", "mix"):
                    opened = c.request(open_message(target, f"toy{i}{strategy}", image, prompt=question,
                                                    max_new_tokens=24))
                    committed, done, seq = [opened.token], opened.done, 0
                    while not done:
                        seq += 1
                        chunk = chunk_for(strategy, ref, len(committed), seq, target.vocab_size, 4)
                        result = c.request(Verify(session=f"toy{i}{strategy}", seq=seq, start=len(committed),
                                                  tokens=np.asarray(chunk, np.int32)))
                        committed += chunk[:result.accepted] + ([result.token] if result.token >= 0 else [])
                        done = result.done
                    assert committed == ref, (question, strategy)
        finally:
            c.close()


# --- sampling -----------------------------------------------------------------------------------

def marginal_p1(target: TargetModel, image: Image.Image, temperature: float, top_k: int) -> np.ndarray:
    """Exact distribution of generated token 1: sum over token 0 of p0(t0) * p1(. | t0)."""
    import torch

    context = target.context(QUESTION, image)
    with torch.inference_mode():
        _, logits0 = target.prefill(context)
        p0 = spec.target_probs(logits0, temperature, top_k)
        p1 = np.zeros(target.vocab_size)
        for t0 in np.nonzero(p0)[0]:
            _, logits1 = target.prefill(context, [int(t0)])
            p1 += p0[t0] * spec.target_probs(logits1, temperature, top_k)
    return p1


def chi_square_p(counts: np.ndarray, p: np.ndarray) -> float:
    """p-value of counts ~ Multinomial(p); cells with expected < 5 are pooled."""
    from scipy.stats import chisquare

    expected = counts.sum() * p
    if counts[p == 0].sum() > 0:
        return 0.0
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    return float(chisquare(observed[keep], expected[keep]).pvalue)


def test_sampling_follows_the_target_distribution(tiny, server):
    """Token 1 committed through verify_sampling (accepted draft or correction) follows p."""
    image = noise_image(8)
    temperature, top_k, n = 0.05, 6, 400
    p1 = marginal_p1(tiny, image, temperature, top_k)
    order = np.argsort(-p1)
    # The draft's fixed q differs from p: uniform over 4 ids, one of them outside p's support.
    q_ids = np.asarray([order[0], order[1], order[3], order[-1]], np.int32)
    q_probs = np.full(4, 0.25, np.float16)
    rng = np.random.default_rng(123)
    drafts = {}
    c = Client(server.address)
    counts, proposals = np.zeros(tiny.vocab_size), np.zeros(tiny.vocab_size)
    try:
        for batch in range(0, n, 50):             # pipelined: open + verify + close back to back
            for i in range(batch, batch + 50):
                drafts[f"s{i}"] = int(q_ids[spec.sample(spec.sparse_q(q_probs), rng)])
                owner = f"{i:032x}"             # chosen by the device, so it need not await `opened`
                c.send(open_message(tiny, f"s{i}", image, temperature=temperature, top_k=top_k, seed=i, owner=owner))
                c.send(Verify(session=f"s{i}", seq=1, owner=owner, start=1,
                              tokens=np.asarray([drafts[f"s{i}"]], np.int32), q_ids=q_ids[None], q_probs=q_probs[None]))
                c.send(Close(session=f"s{i}", seq=2, owner=owner))
            for _ in range(2 * 50):
                message = c.recv()
                assert not isinstance(message, Error), message
                if isinstance(message, Result):
                    token = drafts[message.session] if message.accepted == 1 else message.token
                    counts[token] += 1
                    proposals[drafts[message.session]] += 1
    finally:
        c.close()
    assert counts.sum() == n
    assert chi_square_p(counts, p1) > 1e-3
    assert chi_square_p(proposals, p1) < 1e-6           # negative control: the test has power


# --- bad requests -------------------------------------------------------------------------------

VICTIM = "victim-owner-secret-0001"          # the victim session's owner secret, chosen by its device


def raw(header: dict, *frames: bytes) -> list[bytes]:
    import json

    base = {"v": 1, "type": "verify", "session": "victim", "seq": 50, "owner": VICTIM, "start": 1, "assumed": -1}
    return [json.dumps({**base, **header}).encode()] + list(frames)


def with_header_bytes(frames: list[bytes], old: bytes, new: bytes) -> list[bytes]:
    assert old in frames[0]
    return [frames[0].replace(old, new)] + frames[1:]


def bad_request_cases(target: TargetModel, image: Image.Image) -> list[tuple[str, list[bytes], str]]:
    tokens = {"name": "tokens", "dtype": "int32"}
    v = target.vocab_size
    return [
        ("header is not JSON", [b"\xff{not json"], "bad_json"),
        ("empty header frame", [b""], "bad_json"),
        ("wrong protocol version", raw({"v": 5}), "bad_version"),
        ("a float version", raw({"v": 1.0}), "bad_version"),
        # Issue 30: an owner UTF-8 cannot encode made the owner check raise and dropped the victim.
        ("owner of lone surrogates", raw({"owner": "\ud800" * 16, "arrays": [{**tokens, "shape": [1]}]}, b"\0" * 4),
         "bad_field"),
        ("unknown message type", raw({"type": "hello"}), "unknown_type"),
        ("seq of the wrong type", raw({"seq": "7", "arrays": [{**tokens, "shape": [1]}]}, b"\0" * 4), "bad_field"),
        ("truncated array frame", raw({"arrays": [{**tokens, "shape": [4]}]}, b"\0" * 8), "bad_array"),
        ("missing array frame", raw({"arrays": [{**tokens, "shape": [2]}]}), "missing_frames"),
        ("extra frame", raw({"arrays": [{**tokens, "shape": [1]}]}, b"\0" * 4, b"junk"), "extra_frames"),
        ("missing required array", raw({"arrays": []}), "missing_field"),
        ("huge declared shape", raw({"arrays": [{**tokens, "shape": [1 << 40]}]}, b"\0" * 4), "too_large"),
        ("huge declared image", [encode(open_message(target, "big", image))[0].replace(
            b'"shape":[', b'"shape":[1000000000000') ] + encode(open_message(target, "big", image))[1:], "too_large"),
        ("unknown session", encode(Verify(session="nobody", seq=1, start=1, tokens=np.asarray([3], np.int32))),
         "unknown_session"),
        ("token id too large", encode(Verify(session="victim", seq=50, owner=VICTIM, start=1, tokens=np.asarray([3, v + 5], np.int32))),
         "bad_token"),
        ("negative token id", encode(Verify(session="victim", seq=50, owner=VICTIM, start=1, tokens=np.asarray([-3], np.int32))),
         "bad_token"),
        ("wrong vocab hash", encode(open_message(target, "vh", image, vocab_hash="0" * 64)), "vocab_mismatch"),
        ("image bytes that are no image", encode(Open(session="img", seq=0, image=np.frombuffer(b"GIF89a-no", np.uint8),
                                                      vocab_hash=target.vocab_hash, committed=np.zeros(0, np.int32),
                                                      version=2)), "bad_image"),
        ("prompt places its own image", encode(open_message(target, "p", image, prompt="<image> what ?")), "bad_field"),
        ("context + max_new_tokens over the limit", encode(open_message(target, "long", image, max_new_tokens=500)),
         "too_long"),
        ("a 1 x 4,000,000 strip", encode(open_message(target, "strip", Image.new("RGB", (1, 4_000_000)))), "bad_image"),
        ("a 32 x 500,000 strip", encode(open_message(target, "strip", Image.new("RGB", (32, 500_000)))), "bad_image"),
        ("committed tokens out of range", encode(open_message(target, "reo", image, committed=[v + 1])), "bad_token"),
        ("edge-only message type", encode(Pong(session="victim", seq=50, sessions=3)), "unexpected_type"),
        # Issue 21: each of these got no reply at all.
        ("header nested 30,000 deep", [b'{"v":1,"type":"ping","session":"victim","seq":5,"x":' + b"[" * 30000
                                       + b"]" * 30000 + b"}"], "bad_json"),
        ("5,000-digit seq", [b'{"v":1,"type":"verify","session":"victim","seq":' + b"9" * 5000 + b"}"], "bad_json"),
        ("list as type", raw({"type": ["ping"]}), "unknown_type"),
        ("object as type", raw({"type": {"a": 1}}), "unknown_type"),
        ("shape product overflowing int64", raw({"arrays": [{**tokens, "shape": [1]}, {"name": "q_ids", "dtype": "int32",
                                              "shape": [2 ** 32, 2 ** 32]}]}, b"\0" * 4, b""), "too_large"),
        ("shape beyond int64", raw({"arrays": [{**tokens, "shape": [2 ** 64]}]}, b"\0" * 4), "too_large"),
        # Found by `covspec bench reliability`: got no reply (numpy refused the shape of an empty array).
        ("empty array, dimension beyond int64", raw({"arrays": [{**tokens, "shape": [1]}, {"name": "q_ids", "dtype": "int32",
                                                  "shape": [0, 2 ** 64]}]}, b"\0" * 4, b""), "too_large"),
        ("temperature beyond float", with_header_bytes(encode(open_message(target, "hot", image)),
                                                       b'"temperature":0.0', b'"temperature":1' + b"0" * 400), "bad_field"),
        ("negative seed", with_header_bytes(encode(open_message(target, "seed", image)), b'"seed":0', b'"seed":-1'),
         "bad_field"),
        ("greedy dense verify with a NaN q", encode(Verify(session="dense", seq=2, owner=VICTIM, start=1, tokens=np.asarray([3], np.int32),
                                                           q_dense=np.full((1, v), np.nan, np.float16))), "bad_field"),
    ]


def test_bad_requests_get_errors_while_a_good_session_completes(tiny, server):
    image = noise_image(9)
    ref = reference(tiny, image, 24)
    outcome: dict = {}

    def good_session():
        c = Client(server.address)
        try:
            outcome["committed"] = drive_greedy(c, tiny, "good", image, ref, "mix", 24, width=2)
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc
        finally:
            c.close()

    thread = threading.Thread(target=good_session)
    thread.start()
    bad = Client(server.address)
    try:
        opened = bad.request(open_message(tiny, "victim", image, max_new_tokens=24, seq=40, owner=VICTIM))
        assert opened.token == ref[0] and opened.owner == VICTIM
        bad.request(open_message(tiny, "dense", image, wire="dense", owner=VICTIM))
        for name, frames, code in bad_request_cases(tiny, image):
            bad.send_frames(frames)
            reply = bad.recv()
            assert isinstance(reply, Error) and reply.code == code, (name, reply)
            assert len(reply.message) > 20, name
        # The victim session is intact: rounds, idempotent repeats, replays, stale chunks.
        first = bad.request(Verify(session="victim", seq=51, start=1, tokens=np.asarray(ref[1:3], np.int32)))
        assert (first.status, first.accepted, first.token) == ("ok", 2, ref[3])
        again = bad.request(Verify(session="victim", seq=51, start=1, tokens=np.asarray(ref[1:3], np.int32)))
        assert again == first                                           # same reply, no recomputation
        replayed = bad.request(Verify(session="victim", seq=45, start=4, tokens=np.asarray([ref[4]], np.int32)))
        assert isinstance(replayed, Error) and replayed.code == "replayed"
        stale = bad.request(Verify(session="victim", seq=52, start=1, tokens=np.asarray([ref[1]], np.int32)))
        assert (stale.status, stale.start) == ("stale", 1)
        wrong_assumption = bad.request(Verify(session="victim", seq=53, start=4, assumed=(ref[3] + 1) % tiny.vocab_size,
                                              tokens=np.asarray([ref[4]], np.int32)))
        assert wrong_assumption.status == "stale"
        going_on = bad.request(Verify(session="victim", seq=54, start=4, assumed=ref[3],
                                      tokens=np.asarray(ref[4:6], np.int32)))
        assert (going_on.status, going_on.accepted, going_on.token) == ("ok", 2, ref[6])
        # Sampling sessions need the draft's q, and q must give the draft token mass.
        bad.request(open_message(tiny, "sampler", image, temperature=1.0, seed=1))
        no_q = bad.request(Verify(session="sampler", seq=1, start=1, tokens=np.asarray([3], np.int32)))
        assert isinstance(no_q, Error) and no_q.code == "missing_field"
        zero_q = bad.request(Verify(session="sampler", seq=2, start=1, tokens=np.asarray([3], np.int32),
                                    q_ids=np.asarray([[4, 5]], np.int32), q_probs=np.asarray([[0.5, 0.5]], np.float16)))
        assert isinstance(zero_q, Error) and zero_q.code == "bad_field"
        ok_q = bad.request(Verify(session="sampler", seq=3, start=1, tokens=np.asarray([3], np.int32),
                                  q_ids=np.asarray([[3, 5]], np.int32), q_probs=np.asarray([[0.5, 0.5]], np.float16)))
        assert ok_q.status == "ok"
    finally:
        bad.close()
        thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["committed"] == ref


def test_message_size_limits(tiny):
    with EdgeServer(tiny, ServerConfig(bind=ANY_PORT, max_message_bytes=64 * 1024)) as small:
        c = Client(small.address)
        try:
            # Two frames under the socket's per-frame limit but over the total: refused by decode.
            many = np.zeros((1, 12_000), np.int32)
            c.send(Verify(session="x", seq=1, start=1, tokens=np.asarray([3], np.int32),
                          q_ids=many, q_probs=many.astype(np.float16) + 1))
            assert c.recv().code == "too_large"
            # One frame over MAXMSGSIZE: the socket drops the peer, nothing comes back.
            c.send(Open(session="x", seq=2, image=np.zeros(100_000, np.uint8), vocab_hash=tiny.vocab_hash,
                        committed=np.zeros(0, np.int32), version=2))
            with pytest.raises(TimeoutError):
                c.recv(timeout_ms=1000)
        finally:
            c.close()
        fresh = Client(small.address)
        try:
            assert isinstance(fresh.request(Ping(session="", seq=0)), Pong)   # the server is fine
        finally:
            fresh.close()


# --- sessions: expiry, limits ----------------------------------------------------------------------

def wait_for_sessions(client: Client, count: int, deadline_s: float = 10.0) -> int:
    """Ping until the edge reports ``count`` sessions (or the deadline passes); the last count."""
    end, seq, seen = time.monotonic() + deadline_s, 0, -1
    while time.monotonic() < end:
        seq += 1
        seen = client.request(Ping(session="", seq=seq)).sessions
        if seen == count:
            return seen
        client.socket.poll(50)          # a short pause between probes, nothing to synchronize on
    return seen


def test_idle_session_expires_and_frees_its_cache(tiny):
    image = noise_image(11)
    with EdgeServer(tiny, ServerConfig(bind=ANY_PORT, idle_timeout_s=0.3)) as quick:
        c = Client(quick.address)
        try:
            c.request(open_message(tiny, "idle", image))
            session = quick._model_thread.sessions.get("idle")
            assert session is not None and session.cache is not None
            assert wait_for_sessions(c, 0) == 0
            assert session.cache is None                                 # the KV cache was freed
            reply = c.request(Verify(session="idle", seq=1, start=1, tokens=np.asarray([3], np.int32)))
            assert isinstance(reply, Error) and reply.code == "unknown_session"
        finally:
            c.close()


def test_max_sessions(tiny):
    image = noise_image(12)
    with EdgeServer(tiny, ServerConfig(bind=ANY_PORT, max_sessions=2)) as full:
        c = Client(full.address)
        try:
            assert isinstance(c.request(open_message(tiny, "a", image)), Opened)
            assert isinstance(c.request(open_message(tiny, "b", image)), Opened)
            refused = c.request(open_message(tiny, "c", image))
            assert isinstance(refused, Error) and refused.code == "busy"
            assert isinstance(c.request(open_message(tiny, "a", image, seq=5)), Opened)   # replacing is fine
            c.send(Close(session="b", seq=1))
            assert isinstance(c.request(open_message(tiny, "c", image)), Opened)
        finally:
            c.close()


def test_finished_sessions_give_up_their_slots(tiny):
    """Issue 21, item 14: a session that finished but was never closed frees its cache at
    once and its slot soon after (at once when a new session needs it)."""
    image = noise_image(12)
    with EdgeServer(tiny, ServerConfig(bind=ANY_PORT, max_sessions=2, finished_timeout_s=0.3)) as edge:
        c = Client(edge.address)
        try:
            done = c.request(open_message(tiny, "short", image, max_new_tokens=1))
            assert done.done and edge._model_thread.sessions["short"].cache is None
            assert isinstance(c.request(open_message(tiny, "long", image)), Opened)
            # Full: the finished session's slot is handed over at once.
            assert isinstance(c.request(open_message(tiny, "next", image)), Opened)
            assert "short" not in edge._model_thread.sessions
            c.send(Close(session="next", seq=1))
            assert c.request(open_message(tiny, "short-again", image, max_new_tokens=1)).done
            assert wait_for_sessions(c, 1) == 1                  # ... and after finished_timeout_s anyway
            assert set(edge._model_thread.sessions) == {"long"}
        finally:
            c.close()


def test_the_device_waits_out_a_busy_edge(tiny):
    """CoInference's client asks a busy edge again with backoff instead of failing at once."""
    from covspec.runtime_device.client import EdgeClient, Backoff

    image = noise_image(12)
    with EdgeServer(tiny, ServerConfig(bind=ANY_PORT, max_sessions=1)) as edge:
        holder = Client(edge.address)
        device = EdgeClient(edge.address, Backoff(timeout_s=1.0, retries=2, backoff_s=0.05))
        try:
            assert isinstance(holder.request(open_message(tiny, "holder", image)), Opened)
            threading.Timer(0.5, lambda: holder.send(Close(session="holder", seq=1))).start()
            began = time.monotonic()
            opened = device.request(open_message(tiny, "waiting", image))
            assert isinstance(opened, Opened) and time.monotonic() - began >= 0.4
        finally:
            holder.close()
            device.close()


# --- CurveZMQ and configuration ------------------------------------------------------------------

def make_keys(directory: Path, name: str) -> tuple[bytes, bytes]:
    import zmq.auth

    result = CliRunner().invoke(cli, ["keys", "new", str(directory), "--name", name])
    assert result.exit_code == 0, result.output
    assert (directory / f"{name}.key_secret").stat().st_mode & 0o077 == 0
    return zmq.auth.load_certificate(str(directory / f"{name}.key_secret"))


def test_curve_admits_allowed_keys_only(tiny, tmp_path):
    edge_public, _ = make_keys(tmp_path / "edge", "edge")
    allowed = make_keys(tmp_path / "allowed", "phone")
    allowed_too = make_keys(tmp_path / "allowed", "tablet")
    stranger = make_keys(tmp_path / "strangers", "stranger")
    config = ServerConfig(bind=ANY_PORT, secret_key=tmp_path / "edge" / "edge.key_secret",
                          allow_keys=tmp_path / "allowed")
    with EdgeServer(tiny, config) as secure:
        clients = {
            "allowed": Client(secure.address, curve=(*allowed, edge_public)),
            "stranger": Client(secure.address, curve=(*stranger, edge_public)),
            "wrong server key": Client(secure.address, curve=(*allowed, stranger[0])),
            "plaintext": Client(secure.address),
        }
        try:
            for name in ("stranger", "wrong server key", "plaintext"):
                clients[name].send(Ping(session="", seq=1))
            assert isinstance(clients["allowed"].request(Ping(session="", seq=1)), Pong)
            opened = clients["allowed"].request(open_message(tiny, "secure", noise_image(13)))
            assert isinstance(opened, Opened)
            for name in ("stranger", "wrong server key", "plaintext"):
                with pytest.raises(TimeoutError):
                    clients[name].recv(timeout_ms=500)
            # Another admitted device that learned the owner secret is still not the owner: the
            # session is bound to the key that opened it.
            second = Client(secure.address, curve=(*allowed_too, edge_public))
            try:
                stolen = second.request(Verify(session="secure", seq=1, owner=opened.owner, start=1,
                                               tokens=np.asarray([3], np.int32)))
                assert isinstance(stolen, Error) and stolen.code == "not_owner"
            finally:
                second.close()
            kept = clients["allowed"].request(Verify(session="secure", seq=1, start=1, tokens=np.asarray([3], np.int32)))
            assert isinstance(kept, Result)
        finally:
            for c in clients.values():
                c.close()


def test_a_refused_device_gets_a_clear_error_not_a_hang(tiny, tmp_path, caplog):
    """Issue 21, item 13: the device client neither blocks in send nor waits in silence
    when the edge refuses its key or it speaks no encryption to a keyed edge."""
    from covspec.runtime_device.client import CurveKeys, EdgeClient, EdgeUnreachable, Backoff

    edge_public, _ = make_keys(tmp_path / "edge", "edge")
    make_keys(tmp_path / "allowed", "phone")
    make_keys(tmp_path / "strangers", "stranger")
    config = ServerConfig(bind=ANY_PORT, secret_key=tmp_path / "edge" / "edge.key_secret",
                          allow_keys=tmp_path / "allowed")
    quick = Backoff(timeout_s=0.5, retries=1, backoff_s=0.01)
    with caplog.at_level("WARNING", logger="covspec.edge"), EdgeServer(tiny, config) as secure:
        cases = {"refused this device's key": CurveKeys.load(tmp_path / "strangers" / "stranger.key_secret",
                                                             tmp_path / "edge" / "edge.key"),
                 "handshake": None}
        for expected, keys in cases.items():
            device = EdgeClient(secure.address, quick, keys)
            began = time.monotonic()
            try:
                with pytest.raises(EdgeUnreachable, match=expected):
                    for seq in range(50):        # more than any send buffer holds
                        device.request(Ping(session="", seq=seq))
            finally:
                device.close()
            assert time.monotonic() - began < 10
        allowed = EdgeClient(secure.address, quick, CurveKeys.load(tmp_path / "allowed" / "phone.key_secret",
                                                                   tmp_path / "edge" / "edge.key"))
        try:
            assert isinstance(allowed.request(Ping(session="", seq=1)), Pong)
        finally:
            allowed.close()
    assert any("denied a connection" in record.message for record in caplog.records)


def test_keys_new_refuses_to_overwrite(tmp_path):
    make_keys(tmp_path, "edge")
    result = CliRunner().invoke(cli, ["keys", "new", str(tmp_path), "--name", "edge"])
    assert result.exit_code == 2 and "--force" in result.output


@pytest.mark.parametrize("bind, ok", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:*", True), ("tcp://[::1]:5555", True),
    ("ipc:///tmp/edge", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
    ("tcp://192.168.1.20:5555", False)])
def test_non_loopback_bind_needs_keys_or_insecure(bind, ok):
    if ok:
        ServerConfig(bind=bind).validate()
    else:
        with pytest.raises(ConfigError, match="--insecure"):
            ServerConfig(bind=bind).validate()
        ServerConfig(bind=bind, insecure=True).validate()


def test_cli_refuses_public_bind_before_loading_anything():
    result = CliRunner().invoke(cli, ["edge", "serve", "/nonexistent", "--bind", "tcp://0.0.0.0:5555"])
    assert result.exit_code == 2 and "--insecure" in result.output


def test_cli_reports_a_bad_model_folder(tmp_path):
    result = CliRunner().invoke(cli, ["edge", "serve", str(tmp_path), "--bind", "tcp://127.0.0.1:*"])
    assert result.exit_code == 1 and "config.json" in result.output


def test_edge_help_is_light(no_torch):
    result = no_torch("from covspec.cli.main import cli\ncli()\n", "edge", "serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "--allow-keys" in result.stdout


# --- the edge runtime in a child process: serve, SIGTERM, session log line ----------------------------------

def test_edge_process_serves_and_stops_cleanly_on_sigterm(tiny, tiny_dir, tmp_path):
    from covspec.runtime_edge.process import EdgeProcess

    log = tmp_path / "edge.log"
    edge = EdgeProcess(tiny_dir, ServerConfig(bind=ANY_PORT, threads=1), log_path=log).start()
    try:
        c = Client(edge.address)
        try:
            opened = c.request(open_message(tiny, "child", noise_image(14), max_new_tokens=6))
            result = c.request(Verify(session="child", seq=1, start=1, tokens=np.asarray([3, 4], np.int32)))
            assert isinstance(opened, Opened) and isinstance(result, Result)
        finally:
            c.close()
    finally:
        code = edge.stop()
    assert code == 0
    text = log.read_text()
    assert "session child shutdown: mode=speculative" in text and "rounds=1" in text and "bytes_in=" in text


def test_padded_target_vocabulary(tmp_path):
    """A target whose logits are wider than its tokenizer: same vocab hash, ids checked against the logits."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from covspec.hf.folder import build_word_tokenizer, save_llava_folder
    from covspec.hf.tiny import BASE_WORDS, tiny_llava_config

    tokenizer = build_word_tokenizer(BASE_WORDS)
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(tiny_llava_config(tokenizer.get_vocab_size() + 7)).eval()
    model.generation_config.eos_token_id = 2
    folder = save_llava_folder(model, tokenizer, tmp_path / "padded", image_size=32)
    target = TargetModel.load(folder)
    assert target.vocab_size == tokenizer.get_vocab_size() + 7
    image = noise_image(15)
    ref = reference(target, image, 10)
    with EdgeServer(target, ServerConfig(bind=ANY_PORT)) as padded:
        c = Client(padded.address)
        try:
            assert drive_greedy(c, target, "pad", image, ref, "mix", 10) == ref
            c.request(open_message(target, "pad2", image))
            top = target.vocab_size - 1                      # a padding id: valid for the target
            assert c.request(Verify(session="pad2", seq=1, start=1, tokens=np.asarray([top], np.int32))).status == "ok"
            beyond = c.request(Verify(session="pad2", seq=2, start=2, tokens=np.asarray([top + 1], np.int32)))
            assert beyond.code == "bad_token"
        finally:
            c.close()
