"""The error codes both sides use, and the one exception that carries them.

An ``error`` message carries a stable machine-readable ``code`` (one of the
constants below) and a sentence for a person. The edge raises ``EdgeError``
anywhere while serving a request and the server turns it into an ``error`` reply;
the device raises the same ``EdgeError`` when such a reply arrives. Decoding
failures (``covspec.protocol.messages.ProtocolError``) use the decode codes.
Standard library only.
"""

from __future__ import annotations

# -- decoding a message (``messages.decode``) ---------------------------------------------
BAD_JSON = "bad_json"                 # the header frame is not a UTF-8 JSON object
BAD_VERSION = "bad_version"           # another protocol version
UNKNOWN_TYPE = "unknown_type"         # no such message type
MISSING_FIELD = "missing_field"       # a required field or array is absent (also: q missing when sampling)
BAD_FIELD = "bad_field"               # a field of the wrong type or with an unusable value
BAD_ARRAY = "bad_array"               # an array's declaration or frame does not match its contract
MISSING_FRAMES = "missing_frames"     # fewer frames than the header declares
EXTRA_FRAMES = "extra_frames"         # more frames than the header declares
TOO_LARGE = "too_large"               # a header, array or message beyond the size limits

# -- serving a request (the edge) ----------------------------------------------------------
UNKNOWN_SESSION = "unknown_session"   # no such session (never opened, closed, expired, edge restarted)
NOT_OWNER = "not_owner"               # the session belongs to another device (wrong owner secret or key)
VOCAB_MISMATCH = "vocab_mismatch"     # the device's tokenizer differs from the target's
BAD_TOKEN = "bad_token"               # a token id outside the target's vocabulary
BAD_IMAGE = "bad_image"               # image bytes that do not decode, or too many pixels
REPLAYED = "replayed"                 # a seq older than the session's last handled round
UNEXPECTED_TYPE = "unexpected_type"   # a message only the edge sends (opened, result, pong, error)
WRONG_MODE = "wrong_mode"             # verify sent to a target_only session
TOO_LONG = "too_long"                 # context + max_new_tokens beyond max_context
EXPIRED = "expired"                   # a follow-up turn without its image on an edge that no longer holds the conversation
BUSY = "busy"                         # max_sessions, kv_budget or the request queue is full
INTERNAL = "internal"                 # an unexpected failure (the session was dropped if its owner sent it)

# -- judging a reply (the device; never sent on the wire) ----------------------------------------
BAD_REPLY = "bad_reply"               # a reply that breaks the protocol (covspec.runtime_device.replies)


class EdgeError(Exception):
    """A request the edge refuses: ``code`` is machine-readable, ``message`` a sentence.

    Raised on the edge while serving (the server replies ``error``) and on the device
    when such a reply arrives.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"edge error {code}: {message}")
        self.code = code
        self.message = message
