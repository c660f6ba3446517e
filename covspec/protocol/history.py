"""A conversation's earlier turns on the wire: the ``history`` arrays of an ``open`` (v4).

An ``open`` of a follow-up question carries the conversation's earlier turns as two
arrays: ``history`` (uint8), every text's UTF-8 bytes back to back (question 1, answer 1,
question 2, answer 2, ...), and ``history_sizes`` (int32), each text's length in bytes.
Raw arrays rather than JSON strings, so a long conversation is bounded by the array
limits and not by the header's. ``check`` refuses (``bad_field``) arrays that do not
come together, sizes that do not add up or do not pair, and bytes that are not UTF-8,
so a decoded message's ``turns`` never fails.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covspec.protocol import errors
from covspec.protocol.frames import ProtocolError, require


def arrays(turns: Sequence[tuple[str, str]]) -> dict[str, np.ndarray | None]:
    """``history`` and ``history_sizes`` for ``turns`` ((question, answer) texts); both None for none."""
    if not turns:
        return {"history": None, "history_sizes": None}
    texts = [text.encode("utf-8") for pair in turns for text in pair]
    return {"history": np.frombuffer(b"".join(texts), np.uint8),
            "history_sizes": np.asarray([len(t) for t in texts], np.int32)}


def decode(history: np.ndarray | None, sizes: np.ndarray | None) -> list[tuple[str, str]]:
    """The (question, answer) pairs the arrays hold ([] for none); UnicodeDecodeError on bad bytes."""
    if history is None:
        return []
    texts, at = [], 0
    for size in sizes.tolist():
        texts.append(history[at:at + size].tobytes().decode("utf-8"))
        at += size
    return list(zip(texts[0::2], texts[1::2]))


def check(history: np.ndarray | None, sizes: np.ndarray | None) -> None:
    """``ProtocolError(bad_field)`` unless the arrays are absent together or hold text pairs."""
    require((history is None) == (sizes is None), errors.BAD_FIELD, "history and history_sizes come together")
    if history is None:
        return
    require(sizes.size >= 2 and sizes.size % 2 == 0, errors.BAD_FIELD,
            "history_sizes must give a (question, answer) pair of texts per earlier turn")
    require(bool((sizes >= 0).all()) and int(sizes.astype(np.int64).sum()) == history.size, errors.BAD_FIELD,
            f"history_sizes must be non-negative and add up to history's {history.size} bytes")
    try:
        decode(history, sizes)
    except UnicodeDecodeError as exc:
        raise ProtocolError(errors.BAD_FIELD, f"history is not UTF-8 text ({exc.reason})") from None
