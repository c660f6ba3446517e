"""The edge server over real sockets with real (tiny, config-built) models.

A scripted DEALER client drives ``EdgeServer`` exactly as a device would: greedy
rounds must reproduce ``model.generate()`` token for token, sampling must follow
the target distribution, bad requests get the right error code while other
sessions go on, CurveZMQ admits only allowed keys, idle sessions expire.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from click.testing import CliRunner
from PIL import Image, ImageDraw

from covspec.cli.main import cli
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol import speculative as spec
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

    def send(self, message) -> None:
        self.send_frames(encode(message))

    def send_frames(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout_ms: int = RECV_MS):
        if not self.socket.poll(timeout_ms):
            raise TimeoutError("no reply from the edge")
        return decode(self.socket.recv_multipart())

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
    fields.setdefault("prompt", QUESTION)
    fields.setdefault("max_new_tokens", 16)
    return Open(session=session, seq=fields.pop("seq", 0), image=png(image), vocab_hash=target.vocab_hash,
                committed=np.asarray(fields.pop("committed", []), np.int32), **fields)


def reference(target: TargetModel, image: Image.Image, max_new_tokens: int, question: str = QUESTION,
              eos: int | None = None) -> list[int]:
    """The target's own greedy output via transformers' generate()."""
    import torch

    prompt = target.template.format(question=question)
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

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, above all on a CPU shared with other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_target_only_streams_generate_and_interleaves(tiny, server):
    image = noise_image(6)
    ref = reference(tiny, image, 60)
    streamer, other = Client(server.address), Client(server.address)
    try:
        streamer.send(open_message(tiny, "stream", image, max_new_tokens=60, mode="target_only"))
        opened_other = other.request(open_message(tiny, "other", noise_image(7), max_new_tokens=4))
        tokens, done = [], False
        while not done:
            message = streamer.recv()
            if isinstance(message, Opened):
                tokens.append(message.token)
                done = message.done
            else:
                assert isinstance(message, Result) and message.start == len(tokens) and message.accepted == 0
                tokens.append(message.token)
                done = message.done
        # The other session's open was served long before the 60-token stream ended.
        assert isinstance(opened_other, Opened)
        assert tokens == ref
    finally:
        streamer.close()
        other.close()


# --- toy target on ShapesVQA ------------------------------------------------------------------

def shapes_images() -> list[tuple[Image.Image, str]]:
    try:
        from covspec.toy import shapes
        samples = [shapes.sample("test", i) for i in range(2)]
        return [(s.image(), s.qas[0].question) for s in samples]
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
                c.send(open_message(tiny, f"s{i}", image, temperature=temperature, top_k=top_k, seed=i))
                c.send(Verify(session=f"s{i}", seq=1, start=1, tokens=np.asarray([drafts[f"s{i}"]], np.int32),
                              q_ids=q_ids[None], q_probs=q_probs[None]))
                c.send(Close(session=f"s{i}", seq=2))
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
