"""Errors the edge answers with: a stable code plus a sentence for a person.

``EdgeError`` is raised anywhere in the edge while serving a request; the server
turns it into a protocol ``Error`` reply and keeps serving. Decode failures use the
codes of ``covspec.protocol.messages.ProtocolError`` (bad_json, bad_field, too_large, ...);
the codes below are the edge's own.
"""

from __future__ import annotations

UNKNOWN_SESSION = "unknown_session"   # no such session (never opened, closed, expired, edge restarted)
VOCAB_MISMATCH = "vocab_mismatch"     # the device's tokenizer differs from the target's
BAD_TOKEN = "bad_token"               # a token id outside the target's vocabulary
MISSING_FIELD = "missing_field"       # sampling mode without q_ids/q_probs
BAD_FIELD = "bad_field"               # a field with an unusable value (e.g. q without mass)
BAD_IMAGE = "bad_image"               # image bytes that do not decode, or too many pixels
REPLAYED = "replayed"                 # a seq older than the session's last handled round
UNEXPECTED_TYPE = "unexpected_type"   # a message only the edge sends (opened, result, pong, error)
WRONG_MODE = "wrong_mode"             # verify sent to a target_only session
TOO_LONG = "too_long"                 # context + max_new_tokens beyond max_context
BUSY = "busy"                         # max_sessions or the request queue is full
INTERNAL = "internal"                 # an unexpected failure; the session was dropped


class EdgeError(Exception):
    """A request the edge refuses; ``code`` is machine-readable, ``message`` a sentence."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
