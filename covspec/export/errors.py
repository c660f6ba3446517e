"""Typed errors of `covspec export`; the CLI turns each into a clear click error."""

from __future__ import annotations


class ExportError(Exception):
    """An export could not produce a valid artifact folder."""


class UnsupportedModelError(ExportError):
    """The model's architecture or sub-model types have no export adapter."""


class OutputExistsError(ExportError):
    """The output folder exists and ``force`` was not given."""


class ParityError(ExportError):
    """The exported graphs disagree with PyTorch beyond the bound (fp32 logits, greedy
    tokens) or a quantization loses too much top-1 agreement."""
