"""Batched verification on the edge: one target forward over many sessions commits
exactly what one forward per session commits.

Twin sets of real ``Session``s (different images, so different context lengths;
greedy and seeded sampling with their own temperature/top-k/top-p; the compact and
the dense wire; some target-only) are driven through the same crafted chunks: one set
with every round of an iteration in one ``run_rounds`` call, the other round by round.
The committed sequences must be identical, for the toy target and for families whose
positions or masks make ragged batching delicate (Qwen2-VL's M-RoPE offsets, Gemma 3's
and Mistral's sliding windows, whose contexts here run several windows long). Then a
real edge with its scheduler: many devices at once, every answer the target's own,
and fewer target forwards than rounds (the rounds did share forwards).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from family_checks import noise, png

from covspec.hf.tiny import save_tiny_llava
from covspec.hf.tiny_gemma3 import save_tiny_gemma3
from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl
from covspec.protocol.messages import Open, Ping, Verify
from covspec.protocol.wire import codec_named
from covspec.runtime_edge.rounds import run_rounds
from covspec.runtime_edge.session import Session
from covspec.runtime_edge.target import TargetModel
from covspec.toy.models import bundled_model_dir

SIZES = [(64, 64), (57, 40), (33, 90), (90, 33), (48, 48), (70, 52)]
# (mode, wire, temperature, top_k, top_p) per session
KINDS = [("speculative", "compact", 0.0, 0, 1.0), ("speculative", "compact", 1.0, 0, 1.0),
         ("speculative", "dense", 0.7, 5, 1.0), ("target_only", "compact", 0.0, 0, 1.0),
         ("speculative", "dense", 0.0, 0, 1.0), ("target_only", "compact", 1.3, 0, 0.9)]


def open_sessions(target: TargetModel, question: str, max_new_tokens: int) -> list[Session]:
    sessions = []
    for i, ((mode, wire, temperature, top_k, top_p), size) in enumerate(zip(KINDS, SIZES)):
        image = noise(*size, seed=i)
        message = Open(session=f"s{i}", seq=0, prompt=question, image=np.frombuffer(png(image), np.uint8),
                       max_new_tokens=max_new_tokens, vocab_hash=target.vocab_hash, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=100 + i, mode=mode, wire=wire, committed=np.zeros(0, np.int32))
        sessions.append(Session.open(target, message, image, max_context=1 << 16)[0])
    return sessions


def crafted_chunk(session: Session, vocab: int, rng: np.random.Generator, seq: int) -> Verify:
    """A chunk of 1-6 tokens proposed by the session's wire codec from random q rows (a
    real draft's shape: the token drawn from what travels), as a Verify."""
    codec = codec_named(session.codec.name)
    proposals = [codec.propose(row, session.sampling.greedy, rng)
                 for row in rng.dirichlet(np.full(vocab, 0.3), size=int(rng.integers(1, 7)))]
    rows = [row for _, row in proposals if row is not None]
    return Verify(session=session.id, seq=seq, start=len(session.committed),
                  tokens=np.array([token for token, _ in proposals], np.int32), **codec.encode(rows))


def drive(target: TargetModel, sessions: list[Session], batched: bool, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for seq in range(1, rounds + 1):
        work = []
        for session in sessions:
            if session.done:
                continue
            if session.mode == "target_only":
                work.append((session, session.prepare_step(seq)))
            else:
                prepared = session.prepare(target, crafted_chunk(session, target.vocab_size, rng, seq))
                work.append((session, prepared))
        if not work:
            return
        if batched:
            run_rounds(target, work)
        else:
            for pair in work:
                run_rounds(target, [pair])


def check_batched_equals_unbatched(target: TargetModel, question: str, max_new_tokens: int = 40):
    import torch

    with torch.inference_mode():
        one, many = (open_sessions(target, question, max_new_tokens) for _ in range(2))
        drive(target, one, batched=False, rounds=max_new_tokens, seed=7)
        drive(target, many, batched=True, rounds=max_new_tokens, seed=7)
    assert [s.committed for s in many] == [s.committed for s in one]
    assert all(s.done for s in many)
    assert len({len(s.committed) for s in many}) > 1 or len({tuple(s.committed) for s in many}) > 1


def test_toy_target_batched_equals_unbatched():
    check_batched_equals_unbatched(TargetModel.load(bundled_model_dir("target")), "describe the scene .")


@pytest.mark.parametrize("family", ["qwen2vl", "gemma3", "mistral-sliding"])
def test_families_batched_equal_unbatched(tmp_path, family):
    if family == "qwen2vl":
        folder = save_tiny_qwen2vl(tmp_path / "t", version="2", vocab_rows=80, seed=1)
    elif family == "gemma3":
        folder = save_tiny_gemma3(tmp_path / "t", seed=1, sliding_window=8)
    else:
        folder = save_tiny_llava(tmp_path / "t", seed=3, language="mistral", sliding_window=8, text_layers=3)
    check_batched_equals_unbatched(TargetModel.load(folder), "what color is the circle ?")


def test_a_live_edge_batches_sessions_and_every_answer_is_the_targets(toy_draft_fp32):
    """Eight target-only streams and four drafting devices at once on one edge: the answers
    are the target's own; the streams share forwards (far fewer forwards than tokens),
    which an unbatched edge (``max_batch`` 1) cannot do. So are they when every prompt is
    cut into 2-token chunks that run beside the others' rounds."""
    from covspec.bench.harness.devices import greedy_references
    from covspec.bench.harness.edge import ask
    from covspec.bench.harness.workload import toy_questions
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import EdgeClient, Backoff
    from covspec.runtime_device.engine import CoInference
    from covspec.runtime_device.options import GenerationSettings
    from covspec.runtime_device.target_only import generate_target_only
    from covspec.runtime_edge import EdgeServer, ServerConfig

    artifact = DraftArtifact.load(toy_draft_fp32, threads=1)
    questions = toy_questions(4, describe_share=1.0)
    settings = GenerationSettings(max_new_tokens=32)
    references = greedy_references(bundled_model_dir("target"), questions, settings.max_new_tokens)
    start = threading.Barrier(12)

    def answer(address: str, index: int, answers: dict) -> None:
        question = questions[index % len(questions)]
        client = EdgeClient(address, Backoff(timeout_s=30.0))
        try:
            start.wait()
            if index < 8:
                chunks = generate_target_only(client, question.image_png, question.question, settings)
            else:
                chunks = CoInference(artifact, client).generate(question.image_png, question.question, settings)
            answers[index] = [t for chunk in chunks for t in chunk]
        finally:
            client.close()

    forwards = {}
    # batched; unbatched; batched with prompts cut into 2-token chunks beside the rounds
    for label, max_batch, prefill in ((64, 64, {}), (1, 1, {}), ("chunked", 64, {"prefill_chunk": 2,
                                                                                 "prefill_tokens": 16})):
        with EdgeServer(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*", max_batch=max_batch,
                                                                   threads=1, **prefill)) as server:
            answers: dict[int, list[int]] = {}
            threads = [threading.Thread(target=answer, args=(server.address, i, answers)) for i in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            start.reset()
            assert [answers.get(i) for i in range(12)] == [references[i % 4] for i in range(12)]
            pong = ask(server.address, Ping(session="", seq=0))
            assert pong.committed == sum(len(a) for a in answers.values())
            forwards[label] = pong.forwards
    assert forwards[64] * 2 < forwards[1], forwards
