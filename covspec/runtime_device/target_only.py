"""The baseline without a draft: the edge generates alone and streams each token.

``generate_target_only`` opens a ``target_only`` session and yields each token as its
``result`` arrives. It needs no artifact; ``vocab_hash`` is left empty (the device
tokenizes nothing). Each token is checked (``replies``; against ``vocab_size`` when the
caller knows it) before it is yielded. The session id is derived from the device's
owner secret (``covspec.protocol.ownership``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from covspec.protocol.messages import Close, Open, Opened, Result
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.protocol.verification import NO_TOKEN
from covspec.runtime_device.client import EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_device.replies import check_opened, check_streamed
from covspec.runtime_device.stats import GenerationStats


def generate_target_only(client: EdgeClient, image_bytes: bytes, question: str, settings: GenerationSettings,
                         stats: GenerationStats | None = None, vocab_size: int | None = None) -> Iterator[list[int]]:
    stats = stats if stats is not None else GenerationStats()
    began = time.perf_counter()
    up0, down0 = client.bytes_up, client.bytes_down
    owner = new_owner()
    message = Open(session=session_id_for(owner), seq=0, owner=owner, prompt=question,
                   image=np.frombuffer(image_bytes, np.uint8), max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                   top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, mode="target_only",
                   committed=np.zeros(0, np.int32))
    tokens = 0
    try:
        opened = client.request(message, timeout_s=client.backoff.timeout_s * 2, expect=Opened)
        check_opened(opened, 0, settings.max_new_tokens, vocab_size)
        stats.edge_prefill_ms += opened.prefill_ms
        tokens = 1
        stats.ttft_s = time.perf_counter() - began
        yield [opened.token]
        done = opened.done
        while not done:
            reply = client.receive(message.session, message.seq, client.backoff.timeout_s)
            if reply is None:
                raise EdgeUnreachable(client.explain(f"the edge at {client.address} stopped streaming"))
            if not isinstance(reply, Result):
                raise EdgeError(getattr(reply, "code", "unexpected"), getattr(reply, "message", repr(reply)))
            if reply.start != tokens:
                raise EdgeUnreachable(f"the edge at {client.address} streamed a token at {reply.start} after "
                                      f"{tokens} tokens (a reply was lost); ask again")
            check_streamed(reply, tokens, settings.max_new_tokens, vocab_size)
            stats.edge_verify_ms += reply.verify_ms
            done = reply.done
            if reply.token != NO_TOKEN:
                tokens += 1
                yield [reply.token]
    finally:
        client.send(Close(session=message.session, seq=1, owner=owner))
        stats.tokens = tokens
        stats.wall_s = time.perf_counter() - began
        stats.bytes_up += client.bytes_up - up0
        stats.bytes_down += client.bytes_down - down0
