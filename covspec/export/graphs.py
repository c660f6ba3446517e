"""Export graphs to ONNX files with ``torch.onnx.export``; family-agnostic.

Two exporters: ``torchscript`` (the default: about 10x faster on a small CPU; every
export is checked by the parity stage anyway) and ``dynamo``. Each graph is traced
with batch >= 2 and non-trivial lengths and explicit, named dynamic dimensions, so
no size collapses to a constant (PLATFORM.md, ONNX export):

- ``vision.onnx`` and ``decoder.onnx``: as the family's ``GraphTrace`` says (for
  LLaVA: dynamic batch; dynamic batch, query length S and past length P);
- ``scorer.onnx``: dynamic token count N and question length M.

Each ``export_*`` function writes one file and returns its manifest entry
``{"file", "inputs", "outputs"}``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from covspec.export.errors import ExportError
from covspec.export.scorer import INPUTS as SCORER_INPUTS
from covspec.export.scorer import OUTPUTS as SCORER_OUTPUTS
from covspec.export.scorer import TokenScorer
from covspec.families import GraphTrace


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1: the exporters print whole graphs from C++ on failure."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _export(module, args, path: Path, input_names, output_names, axes: dict[str, dict[int, str]],
            dims: tuple, opset: int, exporter: str) -> dict:
    """Export ``module`` on ``args``. ``axes`` names each dynamic axis (torchscript, and the
    names written into the ONNX file); ``dims`` mirrors ``args`` with ``Dim``s (dynamo)."""
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                                  output_names=output_names, dynamic_axes=axes, opset_version=opset)
            else:
                program = torch.onnx.export(
                    module, args, dynamo=True, input_names=input_names, output_names=output_names,
                    dynamic_shapes=dims, opset_version=opset, external_data=False, optimize=True, verbose=False)
                program.save(str(path))
                _name_dims(path, axes)
    except Exception as exc:  # the exporters raise many unrelated types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path.name}: torch.onnx.export ({exporter}, opset {opset}) failed: {first_line}") from exc
    return {"file": path.name, "inputs": list(input_names), "outputs": list(output_names)}


def _name_dims(path: Path, axes: dict[str, dict[int, str]]) -> None:
    """Give the exporter's symbolic dims (e.g. ``s53``) the names in ``axes``."""
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param or not dim.HasField("dim_value"):
                dim.dim_param = name
    onnx.save(model, str(path))


def export_graph(trace: GraphTrace, path: Path, opset: int, exporter: str) -> dict:
    """Export one family graph (``vision.onnx``, ``decoder.onnx``) traced as ``trace`` says."""
    return _export(trace.module, trace.args, path, trace.input_names, trace.output_names, trace.axes,
                   trace.dims, opset, exporter)


def export_scorer(hidden_size: int, folder: Path, opset: int, exporter: str) -> dict:
    tokens, question = Dim("tokens", min=1, max=65536), Dim("question", min=1, max=65536)
    args = (torch.randn(9, hidden_size), torch.rand(9), torch.randn(4, hidden_size))
    axes = {"image_features": {0: "tokens"}, "activity": {0: "tokens"}, "question_embeds": {0: "question"},
            "relevance": {0: "tokens"}, "score": {0: "tokens"}}
    return _export(TokenScorer().eval(), args, folder / "scorer.onnx", SCORER_INPUTS, SCORER_OUTPUTS,
                   axes, ({0: tokens}, {0: tokens}, {0: question}), opset, exporter)
