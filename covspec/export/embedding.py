"""The token embedding table written in the artifact's precision.

``write_table`` stores the float32 table [V, D] as the manifest's ``embedding`` section
says (formats: ``covspec.runtime_device.embedding``): float32 for an fp32 artifact,
symmetric int8 or int4 blocks of ``BLOCK_SIZE`` columns (one float32 scale per block,
the block's largest magnitude mapped to 127 or 7) for an int8 or int4 one. It returns
the section and the table as the device will see it (dequantized), so the parity
checks measure what the device runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covspec.runtime_device.embedding import dequantize

BLOCK_SIZE = 32
LEVELS = {"int8": 127, "int4": 7}
TABLE_FILE, SCALES_FILE = "embed_tokens.npy", "embed_scales.npy"


def block_size(width: int) -> int:
    """``BLOCK_SIZE`` if it divides the width (and keeps int4 pairs whole), else one block per row."""
    return BLOCK_SIZE if width % BLOCK_SIZE == 0 else width


def quantize_table(table: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, int]:
    """table [V, D] float32 -> (values [V, D/B, B] int8 or [V, D/B, B/2] uint8 (packed
    int4), scales [V, D/B] float32, B)."""
    levels = LEVELS[dtype]
    block = block_size(table.shape[1])
    if dtype == "int4" and block % 2:
        raise ValueError(f"an int4 embedding table needs an even block, not {block}.")
    blocks = np.asarray(table, np.float32).reshape(table.shape[0], -1, block)          # [V, blocks, B]
    scales = np.abs(blocks).max(-1) / levels                                             # [V, blocks]
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    values = np.clip(np.rint(blocks / scales[:, :, None]), -levels - 1, levels).astype(np.int8)
    if dtype == "int4":
        nibbles = (values + 8).astype(np.uint8)
        values = nibbles[:, :, 0::2] | (nibbles[:, :, 1::2] << 4)
    return values, scales, block


def write_table(table: np.ndarray, folder: Path, dtype: str) -> tuple[dict, np.ndarray]:
    """Write the table into ``folder`` as ``dtype`` ("float32", "int8", "int4") -> (the
    manifest's ``embedding`` section, the table [V, D] float32 as the device reads it)."""
    section = {"file": TABLE_FILE, "dtype": dtype, "shape": list(table.shape)}
    if dtype == "float32":
        np.save(folder / TABLE_FILE, np.asarray(table, np.float32), allow_pickle=False)
        return section, np.asarray(table, np.float32)
    values, scales, block = quantize_table(table, dtype)
    np.save(folder / TABLE_FILE, values, allow_pickle=False)
    np.save(folder / SCALES_FILE, scales, allow_pickle=False)
    section.update({"scales": SCALES_FILE, "block_size": block, "symmetric": True})
    return section, dequantize(values, scales, dtype)
