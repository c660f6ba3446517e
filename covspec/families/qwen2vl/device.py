"""The Qwen2-VL / Qwen2.5-VL device half: fixed-size patches, prompt layout, 3-D M-RoPE positions.

Numpy, PIL and tokenizers only; never imports torch or transformers. The functions
reproduce, for one image, what ``Qwen2VLImageProcessor`` (PIL back-end) and the
model's ``get_rope_index`` do, from the manifest's ``image`` section (written by the
export half):

- ``smart_resize``: the processor's resolution rule (both edges multiples of
  ``patch_size * merge_size``, the pixel count within ``min_pixels..max_pixels``, the
  aspect ratio kept as closely as possible). The target sees each image at this
  dynamic resolution; the draft's vision graph has its grid baked in at the export
  size (``size`` [H, W], a resolution ``smart_resize`` keeps as it is), so the device
  resizes every image to that size (``pixel_values``): its visual token count is
  fixed while the target's varies. Exactness never depends on the two agreeing; an
  image already at the export size is seen by the draft exactly as by the target.
- ``patchify``: rescale and normalize, then the processor's flat patch layout
  ``[grid_h * grid_w, C * temporal_patch_size * patch * patch]``, patches ordered by
  2x2 merge block (row-major blocks, row-major inside a block), the still image
  repeated over the temporal patch.
- ``mrope_positions``: the 3-D (temporal, height, width) position ids of a prompt
  holding image runs of given merged grids, equal to ``get_rope_index``: text tokens
  count up on all three axes; an image run starting at position s takes (s, s + row,
  s + column) per merged token; text after it resumes at s + max(rows, columns).
  Generated tokens continue at ``next_position`` on every axis.
- Prompt layout: LLaVA's (the template's one ``<|image_pad|>`` is the image slot,
  ``<|vision_start|>``/``<|vision_end|>`` are text around it).
- Draft context: the prompt's text embeddings around the kept visual tokens; a kept
  token keeps its 3-D position ("original") or all entries are renumbered 0..S-1 on
  every axis ("contiguous").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from covspec.families.common import require_image_keys
from covspec.families.interface import POSITIONS, DraftContext, PromptLayout
from covspec.families.llava.device import LlavaDevice
from covspec.protocol.manifest import ArtifactError

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
IMAGE_KEYS = ("size", "patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels",
              "rescale_factor", "mean", "std", "resample", "do_convert_rgb")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the processor resizes a ``height`` x ``width`` image to."""
    if max(height, width) / min(height, width) > 200:
        raise ArtifactError(f"a {width}x{height} image has an aspect ratio beyond 200:1, which Qwen2-VL refuses.")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, spec: Mapping) -> np.ndarray:
    """A uint8 [H, W, 3] image -> normalized flat patches float32 [grid_h * grid_w, C * T * P * P]."""
    patch, merge, temporal = int(spec["patch_size"]), int(spec["merge_size"]), int(spec["temporal_patch_size"])
    scaled = (image.astype(np.float64) * float(spec["rescale_factor"])).astype(np.float32)
    normalized = ((scaled - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32))
    chw = normalized.transpose(2, 0, 1)                                               # [C, H, W]
    channels, height, width = chw.shape
    grid_h, grid_w = height // patch, width // patch
    patches = chw.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)                                # [h', w', m, m, C, P, P]
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal, patch, patch))
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * temporal * patch * patch),
                                dtype=np.float32)


def pixel_values(image: Image.Image, spec: Mapping) -> np.ndarray:
    """One image resized to the export size ``spec["size"]`` [H, W], as flat patches."""
    if spec.get("do_convert_rgb", True):
        image = image.convert("RGB")
    height, width = (int(x) for x in spec["size"])
    if image.size != (width, height):
        image = image.resize((width, height), resample=RESAMPLE[spec.get("resample", "bicubic")])
    return patchify(np.asarray(image), spec)


def mrope_positions(ids: Sequence[int], image_token_id: int, grids: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """3-D positions [3, L] of a prompt and the next position, as ``get_rope_index``.

    ids: [L] token ids, each run of ``image_token_id`` one image; grids: per image its
    merged (rows, columns) (the processor's ``image_grid_thw`` rows // merge size).
    """
    ids = np.asarray(ids, dtype=np.int64)
    is_image = ids == image_token_id
    starts = np.flatnonzero(is_image & ~np.r_[False, is_image[:-1]])
    ends = np.flatnonzero(is_image & ~np.r_[is_image[1:], False]) + 1
    if len(starts) != len(grids):
        raise ArtifactError(f"the prompt holds {len(starts)} image runs but {len(grids)} image grids were given.")
    parts, cursor, position = [], 0, 0
    for start, end, (rows, columns) in zip(starts, ends, grids):
        if end - start != rows * columns:
            raise ArtifactError(f"an image run of {end - start} tokens does not fill a {rows}x{columns} grid.")
        parts.append(np.broadcast_to(np.arange(start - cursor) + position, (3, start - cursor)))
        position += start - cursor
        row, column = np.divmod(np.arange(rows * columns), columns)
        parts.append(np.stack([np.zeros_like(row), row, column]) + position)
        position += max(rows, columns)
        cursor = end
    parts.append(np.broadcast_to(np.arange(len(ids) - cursor) + position, (3, len(ids) - cursor)))
    positions = np.concatenate(parts, axis=1).astype(np.int64)
    return positions, int(positions.max()) + 1 if positions.size else 0


def merged_grid(spec: Mapping) -> tuple[int, int]:
    """(rows, columns) of merged visual tokens at the export size."""
    height, width = (int(x) for x in spec["size"])
    unit = int(spec["patch_size"]) * int(spec["merge_size"])
    return height // unit, width // unit


class Qwen2VLDevice(LlavaDevice):
    """The ``DeviceHalf`` of a Qwen2-VL / Qwen2.5-VL draft artifact (LLaVA's prompt layout)."""

    def __init__(self, *, image: Mapping, tokenizer_section: Mapping, prompt_template: str, tokenizer,
                 embed_tokens: np.ndarray):
        require_image_keys(image, IMAGE_KEYS)
        self.image = dict(image)
        height, width = (int(x) for x in image["size"])
        factor = int(image["patch_size"]) * int(image["merge_size"])
        if (height, width) != smart_resize(height, width, factor, int(image["min_pixels"]), int(image["max_pixels"])):
            raise ArtifactError(f"manifest.json: 'image.size' {width}x{height} is not a resolution the processor "
                                "keeps; re-export the artifact.")
        self.grid = merged_grid(image)
        self.image_token_id = int(tokenizer_section["image_token_id"])
        self.template = prompt_template
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens                                              # [V, D]

    def vision_inputs(self, image: Image.Image) -> dict[str, np.ndarray]:
        """``pixel_values`` [grid_h * grid_w, C*T*P*P] (graph input) and ``image_grid_thw`` [1, 3]."""
        merge = int(self.image["merge_size"])
        grid = np.array([[1, self.grid[0] * merge, self.grid[1] * merge]], dtype=np.int64)
        return {"pixel_values": pixel_values(image, self.image), "image_grid_thw": grid}

    def pack_visual_tokens(self, feeds, features: np.ndarray, activity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vision graph's [1, N, D] and [1, N] are the image's N = rows x columns merged tokens."""
        if features.shape[1] != self.grid[0] * self.grid[1]:
            raise ArtifactError(f"the vision graph returned {features.shape[1]} visual tokens; the export size "
                                f"makes {self.grid[0]}x{self.grid[1]}.")
        return features[0], activity[0]

    def draft_context(self, layout: PromptLayout, image_features: np.ndarray, kept: np.ndarray,
                      positions: str) -> DraftContext:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}.")
        before, after = layout.segments
        n = image_features.shape[0]
        if n != self.grid[0] * self.grid[1]:
            raise ArtifactError(f"{n} visual tokens do not fill the export grid {self.grid[0]}x{self.grid[1]}.")
        kept = np.unique(np.asarray(kept, dtype=np.int64))                              # [K] ascending
        embeds = np.concatenate([self.embed_tokens[np.asarray(before, dtype=np.int64)], image_features[kept],
                                 self.embed_tokens[np.asarray(after, dtype=np.int64)]])
        if positions == "contiguous":
            return DraftContext(embeds, np.tile(np.arange(len(embeds), dtype=np.int64), (3, 1)), len(embeds))
        ids = [*before, *[self.image_token_id] * n, *after]
        full, next_position = mrope_positions(ids, self.image_token_id, [self.grid])   # [3, L]
        columns = np.concatenate([np.arange(len(before)), len(before) + kept, len(before) + n + np.arange(len(after))])
        return DraftContext(embeds, np.ascontiguousarray(full[:, columns]), next_position)
