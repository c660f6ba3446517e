"""The Idefics3 / SmolVLM device half: image splitting, prompt expansion, draft context.

Numpy, PIL and tokenizers only; never imports torch or transformers.

- Preprocessing, as the manifest's ``image`` section says (the export half writes it
  from the model's ``Idefics3ImageProcessor``), step for step as its PIL back-end does,
  each resize a PIL resize of uint8 pixels: RGB (transparency composited on white);
  resize so the longest edge is ``longest_edge`` (the shorter edge rounded up to even,
  everything under 4096); with ``do_image_splitting``, resize both edges up to
  multiples of ``tile`` and, if larger than one tile, cut ``rows x cols`` tiles in
  row-major order and add the whole image resized to one tile (the global image);
  without it, the whole image resized to one tile. Then rescale (float64, cast to
  float32) and normalize; the vision graph's feed is ``pixel_values [T, 3, tile, tile]``
  (T = rows * cols + 1, or 1).
- Prompt layout: the template filled with the question, its one ``<image>``
  expanded exactly as ``Idefics3Processor`` expands it (``<fake_token_around_image>``
  ``<row_i_col_j>`` + ``image_seq_len`` image tokens per tile, a newline after each
  row, then a newline, ``<fake_token_around_image><global-img>`` + the global image's
  tokens + ``<fake_token_around_image>``), tokenized whole (so merges such as
  ``"\\n\\n"`` happen as in the processor) and split at its runs of image tokens: one
  image slot per tile and one for the global image.
- Draft context: the prompt's text embeddings around the kept visual tokens. The
  visual tokens are flat across tiles ([N, D], N = T * image_seq_len, in prompt
  order); pruning may keep any subset and each kept token keeps its position.

The grid of an image decides its prompt: the feeds carry it (``image_grid`` [2]
int64: rows, cols; not a graph input) and ``prompt_layout(question, feeds)`` reads it
there (without feeds: a square image's grid; ``grid=(rows, cols)`` states it
explicitly). The device half keeps no state between images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from PIL import Image

from covspec.families.common import QUESTION_SLOT, fill_prompt, require_image_keys
from covspec.families.interface import POSITIONS, DeviceHalf, DraftContext, PromptLayout
from covspec.protocol.manifest import ArtifactError

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
IMAGE_KEYS = ("tile", "longest_edge", "do_resize", "do_image_splitting", "resample", "do_convert_rgb",
              "do_rescale", "rescale_factor", "do_normalize", "mean", "std", "image_seq_len", "image_token",
              "fake_image_token", "global_image_token")
MAX_IMAGE_SIZE = 4096   # the processor's absolute bound on the resized image
FRAMES_PER_RUN = 2      # frames per vision-graph run (vision_runs)


def resized_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) with the longest edge ``longest_edge``, the other edge rounded up to
    even, all under ``MAX_IMAGE_SIZE`` (the processor's two size rules, in order)."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(width, 1), max(height, 1)


def tiled_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to multiples of ``tile`` (the processor's
    ``resize_for_vision_encoder``: the shorter edge follows the longer one's scale)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as the processor does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def split_image(image: Image.Image, spec: Mapping) -> tuple[list[Image.Image], tuple[int, int]]:
    """The frames the vision tower sees (tiles in row-major order, then the global image)
    and the grid (rows, cols); (0, 0) when the image is not split."""
    resample = RESAMPLE[spec["resample"]]
    tile = int(spec["tile"])
    if spec["do_convert_rgb"]:
        image = to_rgb(image)
    if spec["do_resize"]:
        image = image.resize(resized_size(*image.size, int(spec["longest_edge"])), resample=resample)
    if not spec["do_image_splitting"]:
        return [image.resize((tile, tile), resample=resample)], (0, 0)
    image = image.resize(tiled_size(*image.size, tile), resample=resample)
    width, height = image.size
    if width <= tile and height <= tile:
        return [image], (0, 0)
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    frames = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
              for r in range(rows) for c in range(cols)]
    return frames + [image.resize((tile, tile), resample=resample)], (rows, cols)


def pixel_values(image: Image.Image, spec: Mapping) -> tuple[np.ndarray, tuple[int, int]]:
    """The vision graph's ``pixel_values`` float32 [T, 3, tile, tile] and the grid."""
    frames, grid = split_image(image, spec)
    array = np.stack([np.asarray(frame) for frame in frames])                     # [T, H, W, 3] uint8
    if spec["do_rescale"]:
        array = (array.astype(np.float64) * float(spec["rescale_factor"])).astype(np.float32)
    array = array.astype(np.float32, copy=False)
    if spec["do_normalize"]:
        array = (array - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32), grid


def image_grid(size: tuple[int, int], spec: Mapping) -> tuple[int, int]:
    """The (rows, cols) grid an image of ``size`` (width, height) is split into."""
    if not spec["do_image_splitting"]:
        return 0, 0
    width, height = size
    if spec["do_resize"]:
        width, height = resized_size(width, height, int(spec["longest_edge"]))
    width, height = tiled_size(width, height, int(spec["tile"]))
    tile = int(spec["tile"])
    if width <= tile and height <= tile:
        return 0, 0
    return (height - tile) // tile + 1, (width - tile) // tile + 1


def expand_image(grid: tuple[int, int], spec: Mapping) -> str:
    """The text the processor puts where the prompt's ``<image>`` stands."""
    image, fake, glob = spec["image_token"], spec["fake_image_token"], spec["global_image_token"]
    tokens = image * int(spec["image_seq_len"])
    rows, cols = grid
    if rows == 0 and cols == 0:
        return f"{fake}{glob}{tokens}{fake}"
    text = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{text}\n{fake}{glob}{tokens}{fake}"


class Idefics3Device(DeviceHalf):
    """The ``DeviceHalf`` of an Idefics3 / SmolVLM draft artifact."""

    def __init__(self, *, image: Mapping, tokenizer_section: Mapping, prompt_template: str, tokenizer,
                 embed_tokens: np.ndarray):
        require_image_keys(image, IMAGE_KEYS)
        if prompt_template.count(image["image_token"]) != 1 or prompt_template.count(QUESTION_SLOT) != 1:
            raise ArtifactError("the prompt template must contain one image token and one {question}.")
        self.image = dict(image)
        self.image_token_id = int(tokenizer_section["image_token_id"])
        self.template = prompt_template
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens                                      # [V, D]
        tile = int(image["tile"])
        self.square_grid = image_grid((tile, tile), self.image)

    def vision_inputs(self, image: Image.Image) -> dict[str, np.ndarray]:
        pixels, grid = pixel_values(image, self.image)
        return {"pixel_values": pixels, "image_grid": np.asarray(grid, dtype=np.int64)}

    def vision_runs(self, feeds: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The frames (tiles, then the global image) in runs of ``FRAMES_PER_RUN``: the vision
        graph treats frames independently and flattens them in order, so the runs' outputs
        concatenated along the token axis are one run's, with the tower's activations held
        for a few frames at a time (SmolVLM-256M: 17 frames of 1,024 patches)."""
        pixels = feeds["pixel_values"]
        return [{**feeds, "pixel_values": pixels[start:start + FRAMES_PER_RUN]}
                for start in range(0, pixels.shape[0], FRAMES_PER_RUN)]

    def pack_visual_tokens(self, feeds, features: np.ndarray, activity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vision graph's [1, N, D] and [1, N] are already the image's N visual tokens in
        prompt order."""
        return features[0], activity[0]

    def prompt_layout(self, question: str, feeds=None, template: str | None = None,
                      grid: tuple[int, int] | None = None) -> PromptLayout:
        if grid is None:
            grid = self.square_grid if feeds is None else tuple(int(x) for x in np.asarray(feeds["image_grid"]))
        grid = tuple(grid)
        image_token = self.image["image_token"]
        if image_token in question:
            raise ArtifactError(f"the question contains {image_token!r}; send the question text only, the "
                                "prompt places the image itself.")
        text = fill_prompt(template or self.template, question)
        text = text.replace(image_token, expand_image(grid, self.image))
        ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)   # special tokens included
        is_image = ids == self.image_token_id
        starts = np.flatnonzero(is_image & ~np.r_[False, is_image[:-1]])
        ends = np.flatnonzero(is_image & ~np.r_[is_image[1:], False]) + 1
        seq = int(self.image["image_seq_len"])
        slots = 1 if grid == (0, 0) else grid[0] * grid[1] + 1
        if len(starts) != slots or np.any(ends - starts != seq):
            raise ArtifactError(f"the expanded prompt has image runs {(ends - starts).tolist()}, expected {slots} "
                                f"of {seq}: the tokenizer does not keep the image tokens whole.")
        bounds = [0, *np.ravel(np.column_stack([starts, ends])).tolist(), len(ids)]
        return PromptLayout(segments=tuple(tuple(ids[bounds[i]:bounds[i + 1]].tolist())
                                           for i in range(0, len(bounds), 2)))

    def draft_context(self, layout: PromptLayout, image_features: np.ndarray, kept: np.ndarray,
                      positions: str) -> DraftContext:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}.")
        seq = int(self.image["image_seq_len"])
        slots = len(layout.segments) - 1
        n = image_features.shape[0]
        if n != slots * seq:
            raise ArtifactError(f"the layout has {slots} image slots of {seq} tokens but the vision graph gave "
                                f"{n} visual tokens: the layout and the features come from different images.")
        # The full prompt: -1 marks a visual token (in prompt order, visual index 0..N-1).
        ids = np.concatenate([np.asarray(part, dtype=np.int64) for i, segment in enumerate(layout.segments)
                              for part in ((segment, np.full(seq, -1)) if i < slots else (segment,))])
        is_visual = ids < 0
        kept = np.unique(np.asarray(kept, dtype=np.int64))                           # [K] ascending
        keep = ~is_visual
        keep[np.flatnonzero(is_visual)[kept]] = True
        embeds = np.empty((int(keep.sum()), self.embed_tokens.shape[1]), dtype=np.float32)
        visual_rows = is_visual[keep]
        embeds[~visual_rows] = self.embed_tokens[ids[keep & ~is_visual]]
        embeds[visual_rows] = image_features[kept]
        if positions == "original":
            return DraftContext(embeds, np.flatnonzero(keep).astype(np.int64), len(ids))
        return DraftContext(embeds, np.arange(len(embeds), dtype=np.int64), len(embeds))
