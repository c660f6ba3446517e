"""Vocabulary hash: proves device and edge tokenize text identically.

The hash covers the token -> id mapping only (not the model's embedding size), so a
target whose embedding matrix is padded beyond the tokenizer still matches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping


def vocab_hash(vocab: Mapping[str, int]) -> str:
    """sha256 hex of the canonical JSON of the token -> id mapping, sorted by id."""
    items = sorted(((int(i), str(t)) for t, i in vocab.items()))
    canonical = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
