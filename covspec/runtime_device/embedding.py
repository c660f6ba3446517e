"""The draft's token embedding table on the device, kept in the artifact's precision.

The manifest's ``embedding`` section says how ``embed_tokens.npy`` is stored:

- ``dtype: "float32"``: the table [V, D] itself;
- ``dtype: "int8"`` / ``"int4"``: symmetric block quantization along D in blocks of
  B = ``block_size`` columns, one float32 scale per block in ``scales`` ([V, D / B]):
  int8 values [V, D / B, B]; int4 values packed two per byte [V, D / B, B / 2] (uint8,
  column 2j of a block in the low nibble, 2j+1 in the high one, stored as value + 8).
  The values are 3-D, so a reader that expects the float32 table [V, D] refuses them.

``load_table`` maps the files read-only (only the rows looked up are ever read) and
returns an object indexed like the float32 table (``table[ids] -> [n, D] float32``,
``table.shape``), so a 150k-row vocabulary costs its stored bytes, not 4 bytes per
weight. ``dequantize`` is the one definition of the stored formats (the exporter's
``covspec.export.embedding`` writes them and checks the round trip). Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from covspec.protocol.manifest import ArtifactError

DTYPES = ("float32", "int8", "int4")


def dequantize(values: np.ndarray, scales: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32 rows [n, D]: values [n, blocks, B] int8 or [n, blocks, B/2]
    uint8 (int4), scales [n, blocks]."""
    if dtype == "int4":
        packed = np.asarray(values, dtype=np.uint8)
        values = np.empty((*packed.shape[:2], packed.shape[2] * 2), np.int8)
        values[:, :, 0::2] = (packed & 0x0F).astype(np.int8) - 8
        values[:, :, 1::2] = (packed >> 4).astype(np.int8) - 8
    rows = values.astype(np.float32) * np.asarray(scales, np.float32)[:, :, None]     # [n, blocks, B]
    return rows.reshape(values.shape[0], -1)


class QuantizedTable:
    """A block-quantized embedding table, dequantized row by row on lookup."""

    dtype = np.dtype(np.float32)      # what lookups return

    def __init__(self, values: np.ndarray, scales: np.ndarray, dtype: str, block_size: int, shape: tuple[int, int]):
        self.values, self.scales = values, scales
        self.stored_dtype, self.block_size = dtype, block_size
        self.shape = (int(shape[0]), int(shape[1]))

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scales.nbytes)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.dtype == bool or ids.ndim > 1:
            raise TypeError("a quantized embedding table is indexed by a 0-d or 1-d array of row ids.")
        rows = np.atleast_1d(ids).astype(np.int64)
        out = dequantize(self.values[rows], self.scales[rows], self.stored_dtype)
        return out[0] if ids.ndim == 0 else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = self[np.arange(self.shape[0])]
        return full if dtype is None else full.astype(dtype)


def load_table(folder: str | Path, section: Mapping) -> np.ndarray | QuantizedTable:
    """The embedding table the manifest's ``embedding`` section describes, memory-mapped;
    ``ArtifactError`` for an unknown dtype or a shape that differs from the manifest's."""
    folder = Path(folder)
    dtype = section.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ArtifactError(f"manifest.json: field 'embedding.dtype' is {dtype!r}; this covspec reads "
                            f"{', '.join(DTYPES)}.")
    shape = tuple(int(n) for n in section["shape"])
    values = np.load(folder / section["file"], mmap_mode="r", allow_pickle=False)
    if dtype == "float32":
        _check(section["file"], values.shape, shape, np.float32, values.dtype)
        return values
    block = int(section.get("block_size", 0))
    if block <= 0 or shape[1] % block or "scales" not in section:
        raise ArtifactError("manifest.json: a quantized 'embedding' needs 'scales' and a 'block_size' dividing "
                            f"the width {shape[1]}.")
    stored = (shape[0], shape[1] // block, block // 2 if dtype == "int4" else block)
    _check(section["file"], values.shape, stored, np.uint8 if dtype == "int4" else np.int8, values.dtype)
    scales = np.load(folder / section["scales"], mmap_mode="r", allow_pickle=False)
    _check(section["scales"], scales.shape, (shape[0], shape[1] // block), np.float32, scales.dtype)
    return QuantizedTable(values, scales, dtype, block, shape)


def _check(name: str, got_shape, shape, dtype, got_dtype) -> None:
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
        raise ArtifactError(f"{name}: {np.dtype(got_dtype)} {list(got_shape)} differs from the manifest's "
                            f"{np.dtype(dtype)} {list(shape)}.")
