"""Weight quantization of exported graphs with onnxruntime's own tools.

- ``int8``, three variants (``INT8_VARIANTS``; the pipeline measures each and keeps
  the one with the best top-1 agreement, the first on a tie):
  ``blockwise``: ``MatMulNBitsQuantizer`` with 8 bits, symmetric weight-only MatMul in
  blocks of ``BLOCK_SIZE`` (onnxruntime-genai's int8); ``per_channel`` and
  ``per_tensor``: ``quantize_dynamic`` (int8 weights, activations quantized per tensor
  at run time) on MatMul/Gemm. On SmolLM2-135M's real weights blockwise keeps 0.967
  top-1 agreement with fp32 step by step, dynamic per-channel 0.871
  (``python -m covspec.bench.device.quality``).
- ``int4``: ``MatMulNBitsQuantizer``, 4-bit symmetric weight-only MatMul in blocks
  of ``BLOCK_SIZE``.

Both ``MatMulNBits`` schemes compute at ``ACCURACY_LEVEL`` 4 (activations quantized to
int8 per block, as onnxruntime-genai's builder writes for CPU): 1.7x faster decode
than level 0 at SmolLM2 size for int4, 28x for int8.

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
INT8_VARIANTS = ("blockwise", "per_channel", "per_tensor")
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4       # MatMulNBits' compute type: 0 float32 activations, 4 int8 activations per block
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


def quantize_int8(source: Path, target: Path, variant: str) -> dict:
    if variant == "blockwise":
        return quantize_blockwise(source, target, 8)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = _graph_bytes(source) // 4 > onnx_files.EXTERNAL_DATA_THRESHOLD
    per_channel = variant == "per_channel"
    with _quiet_quantizer():
        quantize_dynamic(source, target, op_types_to_quantize=INT8_OP_TYPES, per_channel=per_channel,
                         weight_type=QuantType.QInt8, use_external_data_format=external)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "variant": variant,
            "per_channel": per_channel, "op_types": INT8_OP_TYPES}


def quantize_blockwise(source: Path, target: Path, bits: int, accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """Weight-only ``MatMulNBits`` of ``bits`` bits, symmetric, in blocks of ``BLOCK_SIZE``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=accuracy_level)
        quantizer.process()
    external = _graph_bytes(source) * (bits + 1) // 32 > onnx_files.EXTERNAL_DATA_THRESHOLD    # + a scale per block
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    return {"method": "onnxruntime.quantization.MatMulNBitsQuantizer", "bits": bits, "variant": "blockwise",
            "block_size": BLOCK_SIZE, "symmetric": True, "accuracy_level": accuracy_level, "op_types": ["MatMul"]}


def quantize(scheme: str, source: Path, target: Path, variant: str = INT8_VARIANTS[0],
             accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """Quantize ``source`` into ``target`` (``variant``: int8's); returns the details recorded in the manifest."""
    if scheme == "int8":
        if variant not in INT8_VARIANTS:
            raise ValueError(f"unknown int8 variant {variant!r}; choose one of {', '.join(INT8_VARIANTS)}.")
        return quantize_int8(source, target, variant)
    if scheme == "int4":
        return quantize_blockwise(source, target, 4, accuracy_level)
    raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}.")
