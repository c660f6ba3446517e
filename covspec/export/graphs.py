"""Export an adapter's modules to ONNX files with ``torch.onnx.export``.

Two exporters: ``torchscript`` (the default: about 10x faster on a small CPU; every
export is checked by the parity stage anyway) and ``dynamo``. Each graph is traced
with batch >= 2 and non-trivial lengths and explicit, named dynamic dimensions, so
no size collapses to a constant (PLATFORM.md, ONNX export):

- ``vision.onnx``: dynamic batch (image size is fixed by the model);
- ``scorer.onnx``: dynamic token count N and question length M;
- ``decoder.onnx``: dynamic batch B, query length S and past length P.

Each ``export_*`` function writes one file into the artifact folder and returns its
manifest entry ``{"file", "inputs", "outputs"}``.
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

from covspec.export.adapters import LlavaAdapter, past_names, present_names
from covspec.export.errors import ExportError
from covspec.export.scorer import INPUTS as SCORER_INPUTS
from covspec.export.scorer import OUTPUTS as SCORER_OUTPUTS
from covspec.export.scorer import TokenScorer

VISION_INPUTS = ["pixel_values"]
VISION_OUTPUTS = ["image_features", "activity"]
DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids"]
# Tracing sizes: batch >= 2, past and query lengths that are neither 0 nor 1.
TRACE_BATCH, TRACE_PAST, TRACE_QUERY = 2, 7, 3


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


def export_vision(adapter: LlavaAdapter, folder: Path, opset: int, exporter: str) -> dict:
    vision_config = adapter.model.config.vision_config
    size = vision_config.image_size
    pixel_values = torch.randn(TRACE_BATCH, vision_config.num_channels, size, size)
    axes = {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}, "activity": {0: "batch"}}
    return _export(adapter.vision, (pixel_values,), folder / "vision.onnx", VISION_INPUTS, VISION_OUTPUTS,
                   axes, ({0: Dim("batch", min=1, max=1024)},), opset, exporter)


def export_scorer(hidden_size: int, folder: Path, opset: int, exporter: str) -> dict:
    tokens, question = Dim("tokens", min=1, max=65536), Dim("question", min=1, max=65536)
    args = (torch.randn(9, hidden_size), torch.rand(9), torch.randn(4, hidden_size))
    axes = {"image_features": {0: "tokens"}, "activity": {0: "tokens"}, "question_embeds": {0: "question"},
            "relevance": {0: "tokens"}, "score": {0: "tokens"}}
    return _export(TokenScorer().eval(), args, folder / "scorer.onnx", SCORER_INPUTS, SCORER_OUTPUTS,
                   axes, ({0: tokens}, {0: tokens}, {0: question}), opset, exporter)


def export_decoder(adapter: LlavaAdapter, folder: Path, opset: int, exporter: str) -> dict:
    spec = adapter.decoder_spec
    batch, query, past = TRACE_BATCH, TRACE_QUERY, TRACE_PAST
    embeds = torch.randn(batch, query, spec.hidden_size)
    mask = torch.ones(batch, past + query, dtype=torch.int64)
    positions = torch.arange(past, past + query, dtype=torch.int64).expand(batch, -1).contiguous()
    caches = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim) for _ in range(2 * spec.num_layers)]
    pasts, presents = past_names(spec.num_layers), present_names(spec.num_layers)
    axes = {"inputs_embeds": {0: "batch", 1: "query"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "query"}, "logits": {0: "batch", 1: "query"},
            **{name: {0: "batch", 2: "past"} for name in pasts},
            **{name: {0: "batch", 2: "total"} for name in presents}}
    b, s, p = Dim("batch", min=1, max=1024), Dim("query", min=1, max=65536), Dim("past", min=0, max=65536)
    # ``*past`` binds as one argument, so its shapes are one nested tuple; the mask's
    # length (past + query) is left for the exporter to derive.
    dims = ({0: b, 1: s}, {0: b, 1: Dim.AUTO}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in caches))
    return _export(adapter.decoder, (embeds, mask, positions, *caches), folder / "decoder.onnx",
                   DECODER_INPUTS + pasts, ["logits"] + presents, axes, dims, opset, exporter)
