"""The LLaVA device half: image preprocessing, prompt layout and draft context.

Numpy, PIL and tokenizers only; never imports torch or transformers.

- Preprocessing, as the manifest's ``image`` section says (written by the export
  half from the model's own image processor): convert to RGB; resize as ``resize``
  says (``{"shortest_edge": s}``: CLIP-style, the shortest edge to ``s`` keeping the
  aspect ratio; ``{"height": h, "width": w}``: SigLIP-style, a fixed size; ``None``:
  no resize; PIL, bicubic by default); center crop to ``crop_size`` when
  ``do_center_crop``; multiply by ``rescale_factor``; normalize with ``mean``/``std``;
  lay out as float32 [1, 3, H, W]. The result must have the vision input ``size``
  [H, W], else ``ArtifactError`` (a manifest that does not describe its processor).
  Artifacts written before ``resize`` existed record ``resize_shortest_edge``; it is
  read as ``{"shortest_edge": ...}``.
- Prompt layout: the template filled with the question, tokenized, split at its one
  image token.
- Draft context: text embeddings before the image, the kept visual tokens, text
  after; 1-D positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from covspec.families.common import fill_prompt, require_image_keys
from covspec.families.interface import POSITIONS, DeviceHalf, DraftContext, PromptLayout
from covspec.protocol.manifest import ArtifactError

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
IMAGE_KEYS = ("size", "resize", "crop_size", "do_center_crop", "rescale_factor", "mean", "std", "resample",
              "do_convert_rgb")


def resized_size(width: int, height: int, resize: Mapping | None) -> tuple[int, int]:
    """(width, height) after the processor's resize of a ``width`` x ``height`` image."""
    if not resize:
        return width, height
    if resize.get("height") and resize.get("width"):
        return int(resize["width"]), int(resize["height"])
    if resize.get("shortest_edge"):
        shortest = int(resize["shortest_edge"])
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(shortest * long / short)
        return (shortest, new_long) if width <= height else (new_long, shortest)
    raise ArtifactError(f"manifest.json: 'image.resize' must give shortest_edge or height and width, not {dict(resize)}.")


def pixel_values(image: Image.Image, spec: Mapping) -> np.ndarray:
    """The model input for one image: float32 [1, 3, H, W]."""
    if spec.get("do_convert_rgb", True):
        image = image.convert("RGB")
    size = resized_size(*image.size, spec.get("resize"))
    if size != image.size:
        image = image.resize(size, resample=RESAMPLE[spec.get("resample", "bicubic")])
    array = np.asarray(image)                                                 # [H, W, 3] uint8
    if spec.get("do_center_crop", True) and spec.get("crop_size"):
        crop_h, crop_w = spec["crop_size"]
        height, width = array.shape[:2]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        array = array[max(top, 0): max(top, 0) + crop_h, max(left, 0): max(left, 0) + crop_w]
    scaled = (array.astype(np.float64) * float(spec.get("rescale_factor", 1 / 255))).astype(np.float32)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    normalized = (scaled - mean) / std
    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[None], dtype=np.float32)


class LlavaDevice(DeviceHalf):
    """The ``DeviceHalf`` of a LLaVA draft artifact."""

    def __init__(self, *, image: Mapping, tokenizer_section: Mapping, prompt_template: str, tokenizer,
                 embed_tokens: np.ndarray):
        image = dict(image)
        if "resize" not in image and "resize_shortest_edge" in image:   # artifacts of covspec <= 0.1
            image["resize"] = {"shortest_edge": image.pop("resize_shortest_edge")}
        require_image_keys(image, IMAGE_KEYS)
        self.image = image
        self.image_token_id = int(tokenizer_section["image_token_id"])
        self.template = prompt_template
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens                                      # [V, D]

    def vision_inputs(self, image: Image.Image) -> dict[str, np.ndarray]:
        pixels = pixel_values(image, self.image)
        if list(pixels.shape[2:]) != list(self.image["size"]):
            raise ArtifactError(f"the manifest's image preprocessing turns a {image.size[0]}x{image.size[1]} image "
                                f"into {pixels.shape[3]}x{pixels.shape[2]} pixels, but the vision tower takes "
                                f"{self.image['size'][1]}x{self.image['size'][0]}: the artifact's 'image' section "
                                "does not describe its model's processor; re-export it with this covspec.")
        return {"pixel_values": pixels}

    def prompt_layout(self, question: str, feeds=None, template: str | None = None) -> PromptLayout:
        text = fill_prompt(template or self.template, question)
        ids = self.tokenizer.encode(text).ids  # as the processor does, special tokens included
        if ids.count(self.image_token_id) != 1:
            raise ArtifactError("the prompt template must contain exactly one image token.")
        split = ids.index(self.image_token_id)
        return PromptLayout(segments=(tuple(ids[:split]), tuple(ids[split + 1:])))

    def draft_context(self, layout: PromptLayout, image_features: np.ndarray, kept: np.ndarray,
                      positions: str) -> DraftContext:
        before, after = layout.segments
        n = image_features.shape[0]
        embeds = np.concatenate([self.embed_tokens[np.asarray(before, dtype=np.int64)], image_features[kept],
                                 self.embed_tokens[np.asarray(after, dtype=np.int64)]])
        if positions == "original":
            ids = np.concatenate([np.arange(len(before)), len(before) + kept,
                                  len(before) + n + np.arange(len(after))])
            return DraftContext(embeds, ids.astype(np.int64), len(before) + n + len(after))
        if positions == "contiguous":
            return DraftContext(embeds, np.arange(embeds.shape[0], dtype=np.int64), embeds.shape[0])
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}.")
