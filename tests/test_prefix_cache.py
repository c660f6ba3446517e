"""The edge's prefix cache and its KV budget (issue 31), with real models and real sessions.

A session that starts from a cached prefix must give the same logits as a fresh prefill
(up to float rounding) and the same greedy answer, for the toy target and for families
whose positions or masks make continuing a prefix delicate: Qwen2-VL's M-RoPE (the
rest of the context runs at explicit positions offset by the image's), Gemma 3's
bidirectional image attention and sliding windows (contexts several windows long),
Idefics3's tiles. Hits, misses, LRU eviction by bytes, what is never cached, that a
session gets a copy and never the entry's tensors, the counters in ``pong``; and the KV
budget: an open beyond it is answered ``busy`` with a sentence, nobody live is harmed,
and the same open succeeds once a session closes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import torch_on_one_thread
from family_checks import noise, png

from covspec.hf.tiny import save_tiny_llava
from covspec.hf.tiny_gemma3 import save_tiny_gemma3
from covspec.hf.tiny_idefics3 import save_tiny_idefics3
from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl
from covspec.protocol.errors import BUSY, EdgeError
from covspec.protocol.messages import Close, Open, Opened, Ping, Pong
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.runtime_device.client import Backoff, EdgeClient
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.prefix_cache import PrefixCache
from covspec.runtime_edge.session import Session
from covspec.runtime_edge.target import TargetModel
from covspec.toy.models import bundled_model_dir

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "what color is the circle ?"]
ANSWER_TOKENS = 12

one_torch_thread = pytest.fixture(scope="module", autouse=True)(torch_on_one_thread)


@pytest.fixture(scope="module")
def toy() -> TargetModel:
    return TargetModel.load(bundled_model_dir("target"))


def family_target(family: str, folder) -> TargetModel:
    if family == "toy":
        return TargetModel.load(bundled_model_dir("target"))
    if family == "qwen2vl":
        return TargetModel.load(save_tiny_qwen2vl(folder, version="2", vocab_rows=80, seed=1))
    if family == "gemma3":
        return TargetModel.load(save_tiny_gemma3(folder, seed=1, sliding_window=8))
    return TargetModel.load(save_tiny_idefics3(folder, seed=1))


def greedy(target: TargetModel, cache, logits: np.ndarray, tokens: int) -> list[int]:
    """``tokens`` greedy tokens continuing ``cache`` from its last ``logits`` [V]."""
    answer = [int(np.argmax(logits))]
    while len(answer) < tokens:
        answer.append(int(np.argmax(target.extend(cache, answer[-1:])[-1])))
    return answer


def assert_close(cached: np.ndarray, fresh: np.ndarray) -> None:
    scale = float(np.abs(fresh).max())
    assert float(np.abs(cached - fresh).max()) <= 1e-4 * max(scale, 1.0), "a cached prefix changed the logits"


@pytest.mark.parametrize("family", ["toy", "qwen2vl", "gemma3", "idefics3"])
def test_a_cached_prefix_gives_a_fresh_prefills_logits_and_answer(tmp_path, family):
    """Per family: the first question misses and is stored; a follow-up (another question
    about the same image) and the same question again hit; so does a reopen carrying
    committed tokens. Every hit's logits and greedy answer equal a fresh prefill's."""
    target = family_target(family, tmp_path / "target")
    image = noise(57, 40, seed=3)
    data = png(image)
    cache = PrefixCache(1 << 30)
    with torch.inference_mode():
        for i, question in enumerate(QUESTIONS):
            context = target.context(question, image)
            fresh_cache, fresh = target.prefill(context)
            cached_cache, cached, reused = cache.prefill(target, context, data)
            assert (cache.hits, cache.misses) == (2 * i, 1)                 # each reopen below hits too
            assert reused >= (target.family.shortest_reused_prefix(context) if i else 0) and (reused > 0) == (i > 0)
            assert_close(cached, fresh)
            fresh_answer = greedy(target, fresh_cache, fresh, ANSWER_TOKENS)
            assert greedy(target, cached_cache, cached, ANSWER_TOKENS) == fresh_answer
            committed = fresh_answer[:5]                           # a reopen: the prefix, then committed tokens
            reopened_cache, reopened, _ = cache.prefill(target, context, data, committed)
            assert_close(reopened, target.prefill(context, committed)[1])
            assert greedy(target, reopened_cache, reopened, 4) == fresh_answer[5:9]


def test_hits_misses_and_lru_eviction_by_bytes(toy):
    images = [noise(40, 40, seed=s) for s in range(3)]
    with torch.inference_mode():
        one = toy.context(QUESTIONS[0], images[0])
        entry_bytes = toy.prefill(one)[0].kv.copy(one.length).nbytes
        cache = PrefixCache(entry_bytes + entry_bytes // 2)          # room for one entry
        for image in images[:2]:
            cache.prefill(toy, toy.context(QUESTIONS[0], image), png(image))
        assert (cache.hits, cache.misses, cache.evictions, cache.nbytes) == (0, 2, 1, entry_bytes)
        assert cache.prefill(toy, toy.context(QUESTIONS[1], images[1]), png(images[1]))[2] > 0   # kept: a hit
        assert cache.prefill(toy, toy.context(QUESTIONS[1], images[0]), png(images[0]))[2] == 0  # evicted: a miss
        assert (cache.hits, cache.misses, cache.evictions) == (1, 3, 2)
        # A question about another image never matches, however alike the prompts.
        assert cache.prefill(toy, toy.context(QUESTIONS[0], images[2]), png(images[2]))[2] == 0


def test_what_is_never_cached(toy):
    """Off (0 bytes), an entry larger than the bound, and the pruned target (``keep``)
    prefill fresh; the first two count nothing stored, the pruned one is not even looked up."""
    image = noise(40, 40, seed=7)
    with torch.inference_mode():
        context = toy.context(QUESTIONS[0], image)
        off, tiny = PrefixCache(0), PrefixCache(1)
        for cache in (off, tiny, tiny):
            assert cache.prefill(toy, context, png(image))[2] == 0
        assert (off.misses, tiny.misses, tiny.nbytes, len(tiny.entries)) == (0, 2, 0, 0)
        cache = PrefixCache(1 << 30)
        cache.prefill(toy, context, png(image))
        pruned = toy.context(QUESTIONS[0], image, keep=[0, 2, 5])
        assert cache.prefill(toy, pruned, png(image))[2] == 0 and (cache.hits, cache.misses) == (0, 1)


def test_a_session_gets_a_copy_never_the_cached_tensors(toy):
    """Two sessions start from one entry and generate; the entry is unchanged and both
    answer the same as a session without the cache."""
    image = noise(40, 40, seed=9)
    cache = PrefixCache(1 << 30)

    def answer(session_id: str, prefix_cache: PrefixCache | None) -> list[int]:
        message = Open(session=session_id, seq=0, prompt=QUESTIONS[0], image=np.frombuffer(png(image), np.uint8),
                       max_new_tokens=ANSWER_TOKENS, vocab_hash=toy.vocab_hash, mode="target_only",
                       committed=np.zeros(0, np.int32))
        session, opened = Session.open(toy, message, image, max_context=4096, prefix_cache=prefix_cache)
        cached = session.cache
        return greedy(toy, cached, toy.extend(cached, [opened.token])[-1], ANSWER_TOKENS - 1) if cached else []

    with torch.inference_mode():
        reference = answer("plain", None)
        assert answer("first", cache) == reference                           # a miss, stored
        (entry,) = cache.entries.values()
        before = [k.clone() for k in entry.keys]
        assert answer("second", cache) == reference and answer("third", cache) == reference
        assert cache.hits == 2 and all(torch.equal(a, b) for a, b in zip(before, entry.keys))
        assert entry.length == entry.capacity                                 # never grown by a session


def device_open(target: TargetModel, image, max_new_tokens: int = 16) -> Open:
    owner = new_owner()
    return Open(session=session_id_for(owner), owner=owner, seq=0, prompt=QUESTIONS[0],
                image=np.frombuffer(png(image), np.uint8), max_new_tokens=max_new_tokens,
                vocab_hash=target.vocab_hash, committed=np.zeros(0, np.int32))


def test_the_kv_budget_answers_busy_and_admits_once_a_session_closes(toy):
    image = noise(40, 40, seed=11)
    with torch.inference_mode():
        one = Session.open(toy, device_open(toy, image), image, max_context=4096)[0].kv_bytes()
    config = ServerConfig(bind="tcp://127.0.0.1:*", kv_budget=one + one // 2, prefix_cache_bytes=1 << 28)
    with EdgeServer(toy, config) as edge:
        first, second = EdgeClient(edge.address), EdgeClient(edge.address, Backoff(timeout_s=0.3, retries=1))
        try:
            held = device_open(toy, image)
            assert isinstance(first.request(held), Opened)
            waiting = device_open(toy, image)
            with pytest.raises(EdgeError) as refused:                # the device's backoff waited, then gave up
                second.request(waiting)
            assert refused.value.code == BUSY and "--kv-budget" in refused.value.message
            assert "retry later" in refused.value.message
            assert set(edge._model_thread.sessions) == {held.session}            # the live one is unharmed
            first.send(Close(session=held.session, seq=1, owner=held.owner))
            assert isinstance(second.request(waiting), Opened)
            pong = first.request(Ping(session="", seq=0))
            assert isinstance(pong, Pong) and pong.prefix_hits >= 1 and pong.prefix_misses == 1
            assert pong.prefix_bytes > 0
        finally:
            first.close()
            second.close()


def test_a_sessions_kv_never_grows_past_what_the_budget_charged_it():
    """Doubling stops at the session's most positions (context + max_new_tokens + 1), so
    its live bytes stay within what ``kv_bytes`` charged at admission."""
    from covspec.runtime_edge.kv import SessionKV

    kv = SessionKV([torch.zeros(2, 10, 4)], [torch.zeros(2, 10, 4)], length=10)
    kv.limit = 13
    kv.reserve(11)
    assert kv.capacity == 13                   # not 20
    kv.reserve(15)                             # past the limit: room still made, exactly
    assert kv.capacity == 15
    unlimited = SessionKV([torch.zeros(2, 10, 4)], [torch.zeros(2, 10, 4)], length=10)
    unlimited.reserve(11)
    assert unlimited.capacity == 20
