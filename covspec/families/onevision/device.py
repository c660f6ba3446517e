"""The LLaVA-OneVision device half: any-resolution tiling, packing, prompt and context.

Numpy, PIL and tokenizers only; never imports torch or transformers. Everything
here reproduces, for one image, what ``LlavaOnevisionImageProcessor`` (PIL back-end)
and ``LlavaOnevisionModel.pack_image_features`` do, from the manifest's ``image``
section (written by the export half):

- ``tiles``: the grid resolution that fits the image best among ``grid_pinpoints``
  (``best_resolution``), the image resized into it keeping its aspect ratio and
  padded with zeros to it, cut into ``tile`` x ``tile`` tiles in row-major order,
  after a base tile (the whole image resized to ``tile`` x ``tile``); then rescale
  and normalize: float32 [T, 3, tile, tile] with T = 1 + rows x columns.
- ``pack``: the vision graph's per-tile features [T, n, D] (n = side^2 patches) into
  the prompt's visual tokens: the base tile's n, then the grid's patches laid out
  as one image, the rows and columns of the padding cut away (``unpad``), shrunk
  bilinearly when larger than ``vision_aspect_ratio`` ("anyres_max_M": M tiles)
  allows, one ``image_newline`` token after each row. ``image_token_count`` gives
  the count alone (the edge expands its prompt with it).
- Activity: the tower has no CLS token ("full" selection), so it is each token's
  feature norm, packed the same way; a newline token's is the newline's norm.

The prompt layout and the draft context are LLaVA's (one image slot, 1-D positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from covspec.families.common import require_image_keys
from covspec.families.llava.device import RESAMPLE, LlavaDevice
from covspec.protocol.manifest import ArtifactError

IMAGE_KEYS = ("tile", "side", "grid_pinpoints", "vision_aspect_ratio", "image_newline", "rescale_factor", "mean",
              "std", "resample", "do_convert_rgb")


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) among ``pinpoints`` that keeps most of the image at the least waste."""
    best, most, waste = None, 0, math.inf
    for grid_h, grid_w in pinpoints:
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_w * grid_h - effective
        if effective > most or (effective == most and wasted < waste):
            best, most, waste = (int(grid_h), int(grid_w)), effective, wasted
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into ``target`` keeping its aspect ratio."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded_shape(height: int, width: int, rows: int, columns: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of the image's patches in a rows x columns patch
    grid holding the image resized and centered, as ``unpad_image`` cuts them."""
    if width / height > columns / rows:
        new_height = int(round(height * (columns / width), 7))
        padding = (rows - new_height) // 2
        return padding, rows - padding, 0, columns
    new_width = int(round(width * (rows / height), 7))
    padding = (columns - new_width) // 2
    return 0, rows, padding, columns - padding


def shrunk_shape(rows: int, columns: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The unpadded grid's (rows, columns) after the "anyres_max_M" shrink (unchanged when it fits)."""
    ratio = math.sqrt(rows * columns / (max_tiles * side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(columns // ratio)
    return rows, columns


def max_tiles(vision_aspect_ratio: str) -> int:
    return int(vision_aspect_ratio.strip("anyres_max_"))


def grid_layout(height: int, width: int, spec: Mapping) -> tuple[int, int, tuple[int, int, int, int], tuple[int, int]]:
    """(grid rows, grid columns, unpadded bounds, final (rows, columns)) of a height x width image."""
    tile, side = int(spec["tile"]), int(spec["side"])
    best_h, best_w = best_resolution(height, width, spec["grid_pinpoints"])
    grid_rows, grid_columns = best_h // tile, best_w // tile
    bounds = unpadded_shape(height, width, grid_rows * side, grid_columns * side)
    rows, columns = bounds[1] - bounds[0], bounds[3] - bounds[2]
    return grid_rows, grid_columns, bounds, shrunk_shape(rows, columns, side, max_tiles(spec["vision_aspect_ratio"]))


def image_token_count(height: int, width: int, spec: Mapping) -> int:
    """Visual tokens of a height x width image: base tile + grid rows x (columns + newline)."""
    rows, columns = grid_layout(height, width, spec)[3]
    return int(spec["side"]) ** 2 + rows * (columns + 1)


def tiles(image: Image.Image, spec: Mapping) -> np.ndarray:
    """The base tile and the grid tiles of one image, normalized: float32 [T, 3, tile, tile]."""
    if spec.get("do_convert_rgb", True):
        image = image.convert("RGB")
    tile, resample = int(spec["tile"]), RESAMPLE[spec.get("resample", "bicubic")]
    width, height = image.size
    best = best_resolution(height, width, spec["grid_pinpoints"])
    new_h, new_w = fitted_size(height, width, best)
    fitted = np.asarray(image.resize((new_w, new_h), resample=resample))                # [h, w, 3] uint8
    top, extra_h = divmod(best[0] - new_h, 2)
    left, extra_w = divmod(best[1] - new_w, 2)
    padded = np.pad(fitted, ((top, top + extra_h), (left, left + extra_w), (0, 0)))     # [best_h, best_w, 3]
    parts = [np.asarray(image.resize((tile, tile), resample=resample))]
    parts += [padded[i:i + tile, j:j + tile] for i in range(0, best[0], tile) for j in range(0, best[1], tile)]
    stacked = np.stack(parts)                                                           # [T, tile, tile, 3]
    scaled = (stacked.astype(np.float64) * float(spec.get("rescale_factor", 1 / 255))).astype(np.float32)
    normalized = (scaled - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2), dtype=np.float32)


def bilinear(grid: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """[C, H, W] -> [C, rows, columns], as torch's ``interpolate(mode="bilinear")`` (align_corners False)."""
    def weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)

    top, bottom, dy = weights(grid.shape[1], rows)
    left, right, dx = weights(grid.shape[2], columns)
    vertical = grid[:, top] * (1 - dy)[None, :, None] + grid[:, bottom] * dy[None, :, None]
    return vertical[:, :, left] * (1 - dx)[None, None, :] + vertical[:, :, right] * dx[None, None, :]


def pack(features: np.ndarray, activity: np.ndarray, height: int, width: int, newline: np.ndarray,
         spec: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile features [T, n, D] and activity [T, n] of a height x width image -> the packed
    visual tokens [N, D] and their activity [N] (N = ``image_token_count``)."""
    side = int(spec["side"])
    grid_rows, grid_columns, (top, bottom, left, right), (rows, columns) = grid_layout(height, width, spec)
    if features.shape[0] != 1 + grid_rows * grid_columns or features.shape[1] != side * side:
        raise ArtifactError(f"the vision graph returned {features.shape[0]} tiles of {features.shape[1]} tokens for "
                            f"a {width}x{height} image; its tiling makes {1 + grid_rows * grid_columns} of "
                            f"{side * side}.")
    dim = features.shape[2]
    # Features and activity as one [D + 1, H, W] grid: (rows, columns) of tiles of side x side patches.
    channels = np.concatenate([features[1:], activity[1:, :, None]], axis=-1)            # [t, n, D + 1]
    grid = channels.reshape(grid_rows, grid_columns, side, side, dim + 1).transpose(4, 0, 2, 1, 3)
    grid = grid.reshape(dim + 1, grid_rows * side, grid_columns * side)[:, top:bottom, left:right]
    if (rows, columns) != grid.shape[1:]:
        grid = bilinear(grid, rows, columns)
    newline_column = np.broadcast_to(np.append(newline, np.linalg.norm(newline))[:, None, None], (dim + 1, rows, 1))
    laid = np.concatenate([grid, newline_column], axis=2).reshape(dim + 1, -1).T        # [rows * (columns + 1), D + 1]
    packed = np.concatenate([np.concatenate([features[0], activity[0][:, None]], axis=-1), laid])
    return np.ascontiguousarray(packed[:, :dim], np.float32), np.ascontiguousarray(packed[:, dim], np.float32)


class OnevisionDevice(LlavaDevice):
    """The ``DeviceHalf`` of a LLaVA-OneVision draft artifact."""

    def __init__(self, *, image: Mapping, tokenizer_section: Mapping, prompt_template: str, tokenizer,
                 embed_tokens: np.ndarray):
        require_image_keys(image, IMAGE_KEYS)
        self.image = dict(image)
        self.newline = np.asarray(image["image_newline"], dtype=np.float32)               # [D]
        if self.newline.shape != (embed_tokens.shape[1],):
            raise ArtifactError(f"manifest.json: 'image.image_newline' has {self.newline.size} values; the "
                                f"embedding width is {embed_tokens.shape[1]}.")
        self.image_token_id = int(tokenizer_section["image_token_id"])
        self.template = prompt_template
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens                                                  # [V, D]

    def vision_inputs(self, image: Image.Image) -> dict[str, np.ndarray]:
        """``pixel_values`` [T, 3, tile, tile] (graph input) and ``image_sizes`` [1, 2] (height, width)."""
        return {"pixel_values": tiles(image, self.image),
                "image_sizes": np.array([[image.size[1], image.size[0]]], dtype=np.int64)}

    def pack_visual_tokens(self, feeds: Mapping[str, np.ndarray], features: np.ndarray,
                           activity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = (int(x) for x in feeds["image_sizes"][0])
        return pack(features, activity, height, width, self.newline, self.image)
