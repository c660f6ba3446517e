"""Self-certifying session ids (protocol v3): a session id is a hash of its owner secret.

The device picks its owner secret (``new_owner``: 96 random bits) and names its session
``session_id_for(owner)``: the first ``SESSION_ID_CHARS`` hex digits of
SHA-256(``DOMAIN`` + the owner's UTF-8 bytes). Every message of the session carries the
owner, so the edge can check that the id belongs to it; the hash is one-way, so the
id (public: it travels in every header) never reveals the owner. Hence:

- only the owner can open its id, on a live edge and on one that restarted and no
  longer knows the session (there is nothing left to squat: an attacker cannot find
  another owner that hashes to a victim's id, 128 bits);
- nobody can choose an id that collides with someone else's by accident or on purpose.

``derived_form`` tells an id of this form (32 lowercase hex digits). An open naming an
id of this form must carry the owner it is derived from, in every protocol version, so a
v1/v2 device (whose ids are 16 hex digits, or anything else) cannot take a v3 device's
id either. CurveZMQ key binding (the edge remembers the key that opened a session) is
separate and unchanged. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

DOMAIN = b"covspec session id v3\x00"
SESSION_ID_CHARS = 32                      # 128 bits of SHA-256
_DERIVED = re.compile(r"[0-9a-f]{%d}" % SESSION_ID_CHARS)


def new_owner() -> str:
    """A fresh owner secret: 96 random bits, 16 URL-safe characters."""
    return secrets.token_urlsafe(12)


def session_id_for(owner: str) -> str:
    """The session id that ``owner`` certifies (``owner`` must be UTF-8 encodable)."""
    return hashlib.sha256(DOMAIN + owner.encode("utf-8")).hexdigest()[:SESSION_ID_CHARS]


def derived_form(session: str) -> bool:
    """Whether ``session`` has the form of a self-certifying id (whoever opens it must prove it)."""
    return _DERIVED.fullmatch(session) is not None


def certifies(owner: str, session: str) -> bool:
    """Whether ``owner`` is the secret ``session`` was derived from."""
    return hmac.compare_digest(session_id_for(owner), session)
