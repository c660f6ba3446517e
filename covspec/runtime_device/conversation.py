"""A conversation: several questions about one image, each answered in the light of the earlier ones.

The app-facing API::

    with Conversation(CoInference(artifact, client), image_bytes) as chat:
        for text in chat.ask("what is in the picture ?"):
            print(text, end="")
        for text in chat.ask("what color is it ?"):
            print(text, end="")

``ask(question)`` streams the answer's text as the edge commits it (``stream.TextStream``)
and, once the answer is complete, adds the turn to ``history``: the question and the
answer's decoded text (special tokens skipped), both stripped. Each answer is the
target's own answer to the whole conversation, the family's chat template applied to
the history (``families/chat.py``), as a chat client would send it.

What makes a follow-up cheap: its edge session lives on (``DeviceSession`` and the
edge's ``conversation`` sessions), so no image bytes travel and the edge reuses its KV
cache up to where the rendered conversation first differs from what it holds; the
device runs no vision graph and reuses the draft's cache the same way
(``ArtifactDraft.prefill``). An edge that no longer holds the conversation (expired,
evicted for memory, restarted) answers ``expired`` and the device opens it again with
the image and the whole history, transparently. An answer abandoned half-way (the
stream not read to its end, an error) does not join the history.

``close()`` (or leaving the ``with``) ends the edge session. One conversation at a time
per ``CoInference`` (the draft holds one context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from covspec.protocol.messages import Close
from covspec.protocol.ownership import session_id_for
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.session import Turn
from covspec.runtime_device.stats import GenerationStats
from covspec.runtime_device.stream import TextStream


class Conversation:
    """Questions about ``image_bytes`` on ``device``, with its settings and drafting options."""

    def __init__(self, device: CoInference, image_bytes: bytes, settings: GenerationSettings = GenerationSettings(),
                 options: DraftingOptions = DraftingOptions(), decode: Callable[[list[int]], str] | None = None):
        self.device, self.image_bytes = device, image_bytes
        self.settings, self.options = settings, options
        self.decode = decode or device.draft.artifact.decode_text
        self.history: list[tuple[str, str]] = []
        self.turn = Turn()
        self.last_tokens: list[int] = []       # the token ids of the last complete answer

    def ask(self, question: str, settings: GenerationSettings | None = None, stats: GenerationStats | None = None,
            trace: Callable[[dict], None] | None = None) -> Iterator[str]:
        """The answer's text as it is committed; the turn joins ``history`` when it is complete."""
        self.turn.history = tuple(self.history)
        stream = TextStream(self.decode)
        for tokens in self.device.generate(self.image_bytes, question, settings or self.settings, self.options,
                                           stats, trace, turn=self.turn):
            text = stream.push(tokens)
            if text:
                yield text
        self.history.append((question.strip(), stream.text.strip()))
        self.last_tokens = list(stream.tokens)

    def close(self) -> None:
        """End the conversation's session on the edge (nothing to do before the first question)."""
        if self.turn.owner is not None:
            self.device.client.send(Close(session=session_id_for(self.turn.owner), seq=self.turn.seq + 1,
                                          owner=self.turn.owner))
            self.turn = Turn()

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
