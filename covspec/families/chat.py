"""Conversations: several questions about one image, rendered as the family's chat template does.

A conversation is the image, its earlier turns (``history``: (question, answer) pairs, the
answers as decoded text) and the question now asked. Chat templates render it as

    head(q1) + turn(a1, q2) + turn(a2, q3) + ... + turn(a_{n-1}, q_n) + tail

``ChatTurns`` holds the three pieces with ``{question}`` and ``{answer}`` slots (a template
that drops earlier answers has no ``{answer}`` in ``turn``); ``head + tail`` is the
single-question template (``common.prompt_template``). ``chat_turns(processor)`` finds
them by rendering conversations of one, two and three turns with the model's own
``apply_chat_template`` and checks that they compose; a template that renders a
conversation any other way (numbered turns, a system prompt that moves) has none
(None), and such a model answers one question per session.

``ChatTurns.template(history)`` is the prompt template of the next question: the
conversation so far rendered, with ``{question}`` where the new question goes, filled by
``common.fill_prompt`` like the single-question template (which replaces the last slot,
so an earlier text that happens to read ``{question}`` stays text). Every text is stripped
of surrounding whitespace, as ``fill_prompt`` strips the question, so device and edge
render the same conversation from the same texts. The export writes the pieces into the
manifest (``conversation``); the edge derives them from its own processor.

Standard library only: the device imports it, and so does ``common.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

QUESTION_SLOT = "{question}"
ANSWER_SLOT = "{answer}"
History = Sequence[tuple[str, str]]


class ConversationError(ValueError):
    """A conversation the model's template cannot render, or a text it may not carry."""


@dataclass(frozen=True)
class ChatTurns:
    """The pieces of a chat template's conversation (see the module docstring)."""

    head: str      # the image and the first question ({question} once)
    turn: str      # an answer ({answer} at most once) and the next question ({question} once)
    tail: str      # the generation prompt after the last question

    def template(self, history: History) -> str:
        """The template of the question that follows ``history``: ``{question}`` (its last
        occurrence) where it goes."""
        if not history:
            return self.head + self.tail
        parts = [_fill(self.head, {QUESTION_SLOT: history[0][0]})]
        for number, (_, answer) in enumerate(history):
            following = history[number + 1][0] if number + 1 < len(history) else None
            parts.append(_fill(self.turn, {ANSWER_SLOT: answer, QUESTION_SLOT: following}))
        return "".join(parts) + self.tail

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "ChatTurns | None":
        """The manifest's ``conversation`` section (None: the artifact predates it, or its
        template renders no conversation)."""
        if data is None:
            return None
        if not isinstance(data, Mapping) or not all(isinstance(data.get(k), str) for k in ("head", "turn", "tail")):
            raise ConversationError("manifest.json: 'conversation' needs the strings head, turn and tail.")
        return cls(data["head"], data["turn"], data["tail"])


def check_history(history: History, placeholders: Iterable[str]) -> None:
    """``ConversationError`` for a history text that carries an image placeholder (the prompt
    places the one image itself) or a history that is not (question, answer) text pairs."""
    placeholders = [p for p in placeholders if p]
    for number, pair in enumerate(history, 1):
        if len(pair) != 2 or not all(isinstance(text, str) for text in pair):
            raise ConversationError(f"turn {number} of the history must be a (question, answer) pair of texts.")
        for text in pair:
            for token in placeholders:
                if token in text:
                    raise ConversationError(f"turn {number} of the history contains {token!r}; earlier questions "
                                            "and answers are text only, the prompt places the image itself.")


def _fill(piece: str, texts: Mapping[str, str | None]) -> str:
    """``piece`` with each slot replaced by its text, stripped (None leaves the slot). Only the
    piece is searched for slots, never a text put into one."""
    slots = re.compile("|".join(re.escape(slot) for slot in texts))
    out, at = [], 0
    for match in slots.finditer(piece):
        text = texts[match.group()]
        out += [piece[at:match.start()], match.group() if text is None else text.strip()]
        at = match.end()
    return "".join(out) + piece[at:]


MARKERS = {"q1": "QQ1Q", "a1": "AA1A", "q2": "QQ2Q", "a2": "AA2A", "q3": "QQ3Q"}


def chat_turns(processor) -> ChatTurns | None:
    """The ``ChatTurns`` of ``processor``'s chat template (its ``apply_chat_template`` and
    ``image_token``), or None when conversations of one to three turns do not compose."""
    def render(*texts: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[0]}]}]
        for number in range(1, len(texts), 2):
            messages += [{"role": "assistant", "content": [{"type": "text", "text": texts[number]}]},
                         {"role": "user", "content": [{"type": "text", "text": texts[number + 1]}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    m = MARKERS
    try:
        one, two = render(m["q1"]), render(m["q1"], m["a1"], m["q2"])
        three = render(m["q1"], m["a1"], m["q2"], m["a2"], m["q3"])
    except Exception:  # noqa: BLE001 - a template that raises on a conversation renders none
        return None
    if one.count(m["q1"]) != 1:
        return None
    head_end = one.index(m["q1"]) + len(m["q1"])
    head, tail = one[:head_end], one[head_end:]
    if not (two.startswith(head) and two.endswith(tail)) or len(two) < len(head) + len(tail):
        return None
    turn = two[len(head):len(two) - len(tail)]
    if turn.count(m["q2"]) != 1 or turn.count(m["a1"]) > 1:
        return None
    turns = ChatTurns(head.replace(m["q1"], QUESTION_SLOT), turn.replace(m["a1"], ANSWER_SLOT).replace(m["q2"], QUESTION_SLOT),
                      tail)
    image = getattr(processor, "image_token", None)
    composed = turns.template([(m["q1"], m["a1"]), (m["q2"], m["a2"])])
    if composed.replace(QUESTION_SLOT, m["q3"]) != three or (image and (head.count(image) != 1 or image in turn + tail)):
        return None
    return turns
