"""The baseline without a draft: the edge generates alone and streams each token.

``TargetOnly`` is the strategy of the device loop (``loop.Generation``) for
``target_only`` sessions: each step reads the next streamed token. It never reopens:
an edge that stops streaming, or streams a token that does not follow the ones read,
ends the generation with ``EdgeUnreachable`` (ask again). ``generate_target_only``
runs it with no artifact: ``vocab_hash`` is left empty (the device tokenizes nothing)
and each token is checked (``replies``; against ``vocab_size`` when the caller knows
it) before it is yielded. The session id is derived from the device's owner secret
(``covspec.protocol.ownership``).
"""

from __future__ import annotations

from collections.abc import Iterator

from covspec.protocol.messages import Result
from covspec.runtime_device.client import EdgeClient, EdgeError, EdgeUnreachable
from covspec.runtime_device.loop import Generation, Strategy
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.replies import check_streamed
from covspec.runtime_device.stats import GenerationStats


class TargetOnly:
    """Reads the tokens the edge streams; drafts nothing."""

    mode = "target_only"
    prefill = None
    successor: Strategy | None = None

    def begin(self, generation: Generation) -> None:
        self.generation = generation

    def opened(self) -> None:
        """Nothing is in flight."""

    def step(self) -> list[int]:
        generation = self.generation
        client, committed = generation.client, len(generation.committed)
        reply = client.receive(generation.session.id, generation.opened_seq, client.backoff.timeout_s)
        if reply is None:
            raise EdgeUnreachable(client.explain(f"the edge at {client.address} stopped streaming"))
        if not isinstance(reply, Result):
            raise EdgeError(getattr(reply, "code", "unexpected"), getattr(reply, "message", repr(reply)))
        if reply.start != committed:
            raise EdgeUnreachable(f"the edge at {client.address} streamed a token at {reply.start} after "
                                  f"{committed} tokens (a reply was lost); ask again")
        check_streamed(reply, committed, generation.settings.max_new_tokens, generation.vocab_size)
        generation.stats.edge_verify_ms += reply.verify_ms
        return generation.commit_verdict([], reply.token, reply.done)


def generate_target_only(client: EdgeClient, image_bytes: bytes, question: str, settings: GenerationSettings,
                         stats: GenerationStats | None = None, vocab_size: int | None = None) -> Iterator[list[int]]:
    stats = stats if stats is not None else GenerationStats()
    return Generation(client, None, image_bytes, question, settings, DraftingOptions(), stats, lambda event: None,
                      TargetOnly(), vocab_size=vocab_size).tokens()
