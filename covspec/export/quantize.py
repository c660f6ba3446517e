"""Weight quantization of exported graphs with onnxruntime's own tools.

- ``int8``: ``quantize_dynamic`` (int8 weights, activations quantized at run time) on
  MatMul/Gemm, per-channel or per-tensor; the pipeline measures both and keeps the
  one with the better top-1 agreement.
- ``int4``: ``MatMulNBitsQuantizer``, 4-bit symmetric weight-only MatMul in blocks
  of ``INT4_BLOCK_SIZE`` (activations stay float32).

Either reads a graph with external data (``onnx_files``) and writes its output with
external data (``<target>.data``) when the output would pass the 2 GiB file limit.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from covspec.export import onnx_files

SCHEMES = ("fp32", "int8", "int4")
INT8_OP_TYPES = ["MatMul", "Gemm"]
INT4_BLOCK_SIZE = 32
# MatMulNBits' compute type: 0 float32 activations, 4 int8 activations per block (what
# onnxruntime-genai's builder writes for CPU; 1.7x faster decode than 0 at SmolLM2 size).
INT4_ACCURACY_LEVEL = 4
# onnxruntime's quantizers log advice (e.g. "consider pre-processing") through the
# root logger's module-level functions and through these named loggers.
QUANTIZER_LOGGERS = ("onnxruntime.quantization.matmul_nbits_quantizer",)


@contextlib.contextmanager
def _quiet_quantizer():
    """Only errors from onnxruntime's quantizers while inside; every logger is restored after.

    The root logger gets a ``NullHandler`` for the duration so that ``logging.warning``
    does not install a console handler (``basicConfig``) behind the caller's back.
    """
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in QUANTIZER_LOGGERS]
    levels = [logger.level for logger in loggers]
    sink = logging.NullHandler()
    loggers[0].addHandler(sink)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        loggers[0].removeHandler(sink)


def _graph_bytes(path: Path) -> int:
    """Bytes of a graph file and its external data."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in onnx_files.data_files(path))


def quantize_int8(source: Path, target: Path, per_channel: bool) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = _graph_bytes(source) // 4 > onnx_files.EXTERNAL_DATA_THRESHOLD
    with _quiet_quantizer():
        quantize_dynamic(source, target, op_types_to_quantize=INT8_OP_TYPES, per_channel=per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=external)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
            "per_channel": per_channel, "op_types": INT8_OP_TYPES}


def quantize_int4(source: Path, target: Path, accuracy_level: int = INT4_ACCURACY_LEVEL) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=INT4_BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=accuracy_level)
        quantizer.process()
    external = _graph_bytes(source) // 6 > onnx_files.EXTERNAL_DATA_THRESHOLD
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    return {"method": "onnxruntime.quantization.MatMulNBitsQuantizer", "bits": 4,
            "block_size": INT4_BLOCK_SIZE, "symmetric": True, "accuracy_level": accuracy_level,
            "op_types": ["MatMul"]}


def quantize(scheme: str, source: Path, target: Path, per_channel: bool = True,
             accuracy_level: int = INT4_ACCURACY_LEVEL) -> dict:
    """Quantize ``source`` into ``target``; returns the details recorded in the manifest."""
    if scheme == "int8":
        return quantize_int8(source, target, per_channel)
    if scheme == "int4":
        return quantize_int4(source, target, accuracy_level)
    raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}.")
