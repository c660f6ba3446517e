"""Typed errors of `covspec export`; the CLI turns each into a clear click error.

A model no family can export raises the families' ``UnsupportedModelError`` (a
``ModelFolderError``: the CLI reports it as a bad MODEL_DIR).
"""

from __future__ import annotations


class ExportError(Exception):
    """An export could not produce a valid artifact folder."""


class OutputExistsError(ExportError):
    """The output folder exists and ``force`` was not given."""


class ParityError(ExportError):
    """The exported graphs disagree with PyTorch beyond the bound (fp32 logits, greedy
    tokens) or a quantization loses too much top-1 agreement."""
