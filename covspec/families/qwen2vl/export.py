"""The Qwen2-VL / Qwen2.5-VL export half: the vision graph at a fixed size, the M-RoPE decoder,
the manifest sections.

Supported: ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``
(one still image per prompt). Graphs:

- ``vision``: ``pixel_values [P, C*T*p*p] -> image_features [1, N, D], activity [1, N]``
  for one image at the export size (``image_size`` (width, height); its grid is baked
  into the graph, as only the legacy TorchScript exporter can trace this tower): the
  patch embedding, the tower (Qwen2.5: window attention, with full attention in
  ``fullatt_block_indexes``; windows and 2-D rotary positions are constants of the
  grid) and the 2x2 patch merger, in prompt order. There is no CLS token: the activity
  is each merged token's feature norm.
- ``decoder``: the language model with a flat KV cache and 3-D positions
  (``position_ids [3, B, S]``, ``covspec.families.text_export``).

The export size is the user's (``covspec export --image-size``), else ``default_size``:
``DEFAULT_SIDE`` px square rounded by the processor's own ``smart_resize`` (so that it
respects ``min_pixels``/``max_pixels`` and the patch x merge multiple). An explicit
size must be one the processor keeps as it is (``ImageSizeError`` names the nearest one),
so that an image of that size is seen by the draft exactly as by the target.

Torch and transformers; imported by the exporter only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from covspec.families.interface import GraphTrace, ImageSizeError, UnsupportedModelError
from covspec.families.common import fill_prompt, prompt_template
from covspec.families.llava.export import RESAMPLE_NAMES
from covspec.families.qwen2vl.device import merged_grid, smart_resize
from covspec.families.text_export import FlatCacheDecoder, decoder_graph, decoder_spec, tokenizer_section

DEFAULT_SIDE = 448   # 16 x 16 merged tokens at Qwen2-VL's 28 px (patch 14 x merge 2)


def default_size(ip) -> tuple[int, int]:
    """(width, height): ``DEFAULT_SIDE`` square as the processor's ``smart_resize`` makes it."""
    factor = ip.patch_size * ip.merge_size
    height, width = smart_resize(DEFAULT_SIDE, DEFAULT_SIDE, factor, _pixels(ip)[0], _pixels(ip)[1])
    return width, height


def _pixels(ip) -> tuple[int, int]:
    size = ip.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return int(get("shortest_edge")), int(get("longest_edge"))


def check_size(ip, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` (width, height) if the processor keeps it, else ``ImageSizeError``."""
    width, height = size
    factor = ip.patch_size * ip.merge_size
    kept_h, kept_w = smart_resize(height, width, factor, *_pixels(ip))
    if (kept_w, kept_h) != (width, height):
        raise ImageSizeError(f"image size {width}x{height} is not a resolution this model's processor keeps (multiples "
                        f"of {factor} px, {_pixels(ip)[0]}..{_pixels(ip)[1]} pixels); the nearest is "
                        f"{kept_w}x{kept_h}.")
    return width, height


class Qwen2VLVision(nn.Module):
    """Tower + merger of a Qwen2-VL / Qwen2.5-VL model for one image of a fixed grid."""

    def __init__(self, model, grid: tuple[int, int, int]):
        super().__init__()
        self.visual = model.model.visual
        self.register_buffer("grid_thw", torch.tensor([grid], dtype=torch.long), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.visual(pixel_values, grid_thw=self.grid_thw).pooler_output[None]    # [1, N, D]
        return features, features.norm(dim=-1)


class Qwen2VLExport:
    """The ``ExportHalf`` of a loaded Qwen2-VL / Qwen2.5-VL draft."""

    def __init__(self, model, processor, image_size: tuple[int, int] | None = None):
        ip = processor.image_processor
        if ip.temporal_patch_size != model.config.vision_config.temporal_patch_size or \
                ip.merge_size != model.config.vision_config.spatial_merge_size:
            raise UnsupportedModelError("the image processor's patch layout differs from the vision tower's.")
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)
        self.input_size = check_size(ip, tuple(image_size)) if image_size else default_size(ip)
        width, height = self.input_size
        self.grid = (1, height // ip.patch_size, width // ip.patch_size)
        self.vision = Qwen2VLVision(model, self.grid).eval()
        text = model.config.text_config
        self.decoder = FlatCacheDecoder(model.model.language_model, model.lm_head, text).eval()
        self.decoder_spec = decoder_spec(text, model.get_input_embeddings().weight.shape[0])

    def vision_graph(self) -> GraphTrace:
        vision = self.model.config.vision_config
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixel_values = torch.randn(self.grid[1] * self.grid[2], width)
        return GraphTrace(self.vision, (pixel_values,), ["pixel_values"], ["image_features", "activity"], {}, ({},))

    def decoder_graph(self) -> GraphTrace:
        return decoder_graph(self.decoder, self.decoder_spec, position_axes=3)

    def embed_tokens(self) -> np.ndarray:
        return self.model.get_input_embeddings().weight.detach().float().numpy().astype(np.float32)

    def processor_inputs(self, image, question: str) -> dict:
        return dict(self.processor(images=image, text=fill_prompt(self.template, question),
                                   return_tensors="pt"))

    def vision_feeds(self, inputs) -> dict[str, np.ndarray]:
        grid = inputs["image_grid_thw"].numpy().astype(np.int64)                        # [1, 3]
        if tuple(grid[0]) != self.grid:
            raise ImageSizeError(f"the parity image was processed to a {grid[0].tolist()} grid; the vision graph is "
                            f"exported for {list(self.grid)} (use images of the export size {self.input_size}).")
        return {"pixel_values": inputs["pixel_values"].numpy().astype(np.float32), "image_grid_thw": grid}

    def image_section(self) -> dict:
        ip = self.processor.image_processor
        resample = getattr(ip, "resample", 3)
        width, height = self.input_size
        section = {
            "size": [height, width], "patch_size": int(ip.patch_size), "merge_size": int(ip.merge_size),
            "temporal_patch_size": int(ip.temporal_patch_size), "min_pixels": _pixels(ip)[0],
            "max_pixels": _pixels(ip)[1],
            "rescale_factor": float(ip.rescale_factor) if ip.do_rescale else 1.0,
            "mean": [float(x) for x in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
            "std": [float(x) for x in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
            "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
            "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
        }
        assert merged_grid(section) == (self.grid[1] // ip.merge_size, self.grid[2] // ip.merge_size)
        return section

    def tokenizer_section(self, tokenizer_file: Path) -> dict:
        return tokenizer_section(self.model, self.processor, tokenizer_file, self.model.config.image_token_id)

    def source_section(self) -> dict:
        config = self.model.config
        return {"architecture": type(self.model).__name__, "text_model_type": config.text_config.model_type,
                "vision_model_type": config.vision_config.model_type, "image_size": list(self.input_size)}
