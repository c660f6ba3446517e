"""Export graphs to ONNX files with ``torch.onnx.export``; family-agnostic.

Two exporters: ``torchscript`` (the default: about 10x faster on a small CPU; every
export is checked by the parity stage anyway) and ``dynamo``. Each graph is traced
with batch >= 2 and non-trivial lengths and explicit, named dynamic dimensions, so
no size collapses to a constant (a dimension traced at 0 or 1 gets specialized):

- ``vision.onnx`` and ``decoder.onnx``: as the family's ``GraphTrace`` says (for
  LLaVA: dynamic batch; dynamic batch, query length S and past length P);
- ``scorer.onnx``: dynamic token count N and question length M.

``kv_cache_layout`` tells from a decoder graph whether its cache can be one shared
buffer (the manifest's ``decoder.kv_cache``).

Each ``export_*`` function writes one file and returns its manifest entry
``{"file", "inputs", "outputs"}``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch.export import Dim

from covspec.export import onnx_files
from covspec.export.errors import ExportError
from covspec.export.scorer import INPUTS as SCORER_INPUTS
from covspec.export.scorer import OUTPUTS as SCORER_OUTPUTS
from covspec.export.scorer import TokenScorer
from covspec.families import GraphTrace
from covspec.families.text_export import NUM_LOGITS, dynamo_translations


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
    names written into the ONNX file); ``dims`` mirrors ``args`` with ``Dim``s (dynamo).
    The exporter writes into a folder of its own (past 2 GiB, torchscript writes a file
    per weight), gathered into ``path`` (+ ``path.data`` past ``onnx_files.EXTERNAL_DATA_THRESHOLD``)."""
    scratch = path.with_name(f".{path.name}.export")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    written = scratch / path.name
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(written), dynamo=False, input_names=input_names,
                                  output_names=output_names, dynamic_axes=axes, opset_version=opset)
            else:
                program = torch.onnx.export(
                    module, args, dynamo=True, input_names=input_names, output_names=output_names,
                    dynamic_shapes=dims, opset_version=opset, external_data=False, optimize=True, verbose=False,
                    custom_translation_table=dynamo_translations())
                program.save(str(written))
                onnx_files.edit(written, lambda model: _name_dims(model, axes))
        onnx_files.gather(scratch, path.name, path)
    except Exception as exc:  # the exporters raise many unrelated types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path.name}: torch.onnx.export ({exporter}, opset {opset}) failed: {first_line}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"file": path.name, "inputs": list(input_names), "outputs": list(output_names)}


def _name_dims(model: onnx.ModelProto, axes: dict[str, dict[int, str]]) -> None:
    """Give the exporter's symbolic dims (e.g. ``s53``) the names in ``axes``."""
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param or not dim.HasField("dim_value"):
                dim.dim_param = name


def export_graph(trace: GraphTrace, path: Path, opset: int, exporter: str) -> dict:
    """Export one family graph (``vision.onnx``, ``decoder.onnx``) traced as ``trace`` says.
    A decoder's ``num_logits`` input becomes optional (an initializer of 0: every row)."""
    entry = _export(trace.module, trace.args, path, trace.input_names, trace.output_names, trace.axes,
                    trace.dims, opset, exporter)
    if NUM_LOGITS in trace.input_names:
        _default_input(path, NUM_LOGITS, 0)
    return entry


def _default_input(path: Path, name: str, value: int) -> None:
    """Give the int64 scalar input ``name`` a default (an initializer of the same name), so
    that onnxruntime treats it as an overridable initializer, not a required input."""
    def change(model: onnx.ModelProto) -> None:
        if all(init.name != name for init in model.graph.initializer):
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), name))

    onnx_files.edit(path, change)


def export_scorer(hidden_size: int, folder: Path, opset: int, exporter: str) -> dict:
    tokens, question = Dim("tokens", min=1, max=65536), Dim("question", min=1, max=65536)
    args = (torch.randn(9, hidden_size), torch.rand(9), torch.randn(4, hidden_size))
    axes = {"image_features": {0: "tokens"}, "activity": {0: "tokens"}, "question_embeds": {0: "question"},
            "relevance": {0: "tokens"}, "score": {0: "tokens"}}
    return _export(TokenScorer().eval(), args, folder / "scorer.onnx", SCORER_INPUTS, SCORER_OUTPUTS,
                   axes, ({0: tokens}, {0: tokens}, {0: question}), opset, exporter)


def kv_cache_layout(path: Path, past_names: list[str]) -> str:
    """``"shared-buffer"`` if every past input of the decoder graph at ``path`` feeds only
    ``GroupQueryAttention`` nodes as their past key/value (so it may share one buffer with
    the present, whose sequence axis is its capacity), and at most ``Shape`` nodes that
    read the axes before the sequence axis (dynamo takes the batch size from a past);
    else ``"concat"``."""
    graph = onnx.load(str(path), load_external_data=False).graph      # the proto only
    uses = {name: [] for name in past_names}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in uses:
                uses[name].append(_reads_past_as_buffer(node, slot))
    shared = all(found and all(found) for found in uses.values()) and \
        all(any(_feeds_attention(node, name) for node in graph.node) for name in past_names)
    return "shared-buffer" if shared else "concat"


def _feeds_attention(node, name: str) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and name in node.input[3:5]


def _reads_past_as_buffer(node, slot: int) -> bool:
    """Whether ``node`` reads its input ``slot`` (a past) only as a shared buffer may be read."""
    if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
        return slot in (3, 4)
    if node.op_type == "Shape":
        end = next((attr.i for attr in node.attribute if attr.name == "end"), None)
        return end is not None and 0 <= end <= 2
    return False
