"""Turn committed token ids into text increments for streaming output."""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Decodes the whole committed sequence each time and returns only the new suffix,
    so tokenizers that merge pieces across tokens still stream correctly."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self.decode(self.tokens)
        # Printed text cannot be taken back; if a merge rewrote earlier characters,
        # only what lies beyond the printed length is new.
        increment = text[len(self.text):]
        self.text = text
        return increment
