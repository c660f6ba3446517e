"""Conversations on the edge: a follow-up question continues its session's own KV cache.

A device that asks several questions about one image opens its session with
``conversation`` set and sends each follow-up as an ``open`` of the same session that
carries the earlier turns (``history``: questions and answers as text) and, while the
edge still holds the session, no image bytes (PROTOCOL.md, "Conversations"):

- ``turn_image(msg, old, decode)``: the image a question asks about, its bytes and it
  decoded; a follow-up without image bytes asks about the session's own, decoded once.
- ``conversation_template(target, msg)``: the template of the new question, the
  conversation rendered by the target family's own chat template (``families/chat.py``);
  ``EdgeError(BAD_FIELD)`` when the family renders no conversation or a history text
  carries an image placeholder. None for a first question (the family's own template).
- ``continue_from(target, previous, context, committed)``: the new context's prefill
  started from the previous turn's cache. Its ids (the image, the earlier prompt and
  answer) are compared with the new context's; the cache is rolled back to the longest
  common prefix, which must cover the family's ``shortest_reused_prefix`` (the image),
  and only the rest runs, as one cached extension (``TargetModel.prefill_after``): the
  logits equal a fresh prefill's up to float rounding, and never does the target see an
  id that the new prompt does not hold (a rendered end-of-turn that differs from the
  generated one, a merge across the boundary: the prefix simply ends earlier). The new
  session takes the cache over (``previous.cache`` becomes None). None when nothing can
  be reused (no cache, another image, a pruned target, a prefix short of the image).
  ``continued_prefix`` is its first half (the rolled-back KV), for a prefill in pieces.

One thread only (the model thread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from covspec.families.chat import ConversationError, check_history
from covspec.protocol.errors import BAD_FIELD, EXPIRED, EdgeError
from covspec.protocol.messages import Open
from covspec.runtime_edge.kv import SessionKV
from covspec.runtime_edge.prefix_cache import common_length
from covspec.runtime_edge.target import Context, TargetCache, TargetModel


def turn_image(msg: Open, old, decode: Callable[[bytes], object]) -> tuple[bytes, object]:
    """(the image's bytes, the image decoded) that ``msg`` asks about: its own bytes, or on a
    follow-up that sends none the image of ``old`` (the session's last turn), whose decoded
    image is used again when the bytes are the same (so is its preprocessing:
    ``processed_images.py``). ``EdgeError(EXPIRED)`` when neither holds an image."""
    data = msg.image.tobytes() if msg.image.size else getattr(old, "image", b"")
    if not data:
        raise EdgeError(EXPIRED, f"this edge no longer holds the conversation of session {msg.session!r} "
                                 "(it expired after being idle, was evicted for memory, or the edge "
                                 "restarted); open it again with the image and the whole history.")
    if old is not None and old.picture is not None and old.image == data:
        return data, old.picture
    return data, decode(data)


def conversation_template(target: TargetModel, msg: Open) -> str | None:
    """The template of ``msg``'s question after its history (None without history)."""
    turns = msg.turns
    if not turns:
        return None
    if target.family.turns is None:
        raise EdgeError(BAD_FIELD, "this target's chat template renders no conversation of several turns; "
                                   "ask each question in a session of its own (without history).")
    try:
        check_history(turns, target.family.placeholders())
    except ConversationError as exc:
        raise EdgeError(BAD_FIELD, str(exc)) from None
    return target.family.turns.template(turns)


def continue_from(target: TargetModel, previous, context: Context, image: bytes,
                  committed: Sequence[int]) -> tuple[TargetCache, np.ndarray, int] | None:
    """(cache, logits [V], reused context tokens) from ``previous``'s cache (a ``Session`` of
    the same owner), or None when none of it can be reused."""
    kv = continued_prefix(target, previous, context, image)
    if kv is None:
        return None
    ids = [int(i) for i in context.inputs["input_ids"][0].tolist()]
    cache, logits = target.prefill_after(context, kv, ids[kv.length:] + [int(t) for t in committed])
    return cache, logits, kv.length


def continued_prefix(target: TargetModel, previous, context: Context, image: bytes) -> SessionKV | None:
    """``previous``'s KV rolled back to the longest prefix it shares with ``context`` (taken over:
    ``previous.cache`` becomes None), for a prefill of the rest (``continue_from``, or the model
    thread's prefill in pieces, ``prefill.Prefill``); None when none of it can be reused."""
    if previous is None or previous.cache is None or previous.image != image or context.keep is not None:
        return None
    floor = target.family.shortest_reused_prefix(context)
    ids = [int(i) for i in context.inputs["input_ids"][0].tolist()]
    held = previous.context_ids + previous.committed
    shared = min(common_length(held, ids), previous.cache.kv.length, len(ids) - 1)
    if floor is None or shared < floor:
        return None
    kv, previous.cache = previous.cache.kv, None
    kv.rollback(shared)
    return kv
