"""The LLaVA-OneVision export half: the tile vision graph and the manifest sections.

Supported: ``LlavaOnevisionForConditionalGeneration`` with a SigLIP tower and "full"
feature selection (every released OneVision checkpoint) and a Llama, Mistral or
Qwen2 language model. Graphs:

- ``vision``: ``pixel_values [T,3,H,W] -> image_features [T,n,D], activity [T,n]``,
  the tiles (base + grid) of one image through the tower and projector exactly as
  the model selects them, before packing (LLaVA's ``LlavaVision``: the feature norm
  as activity, there being no CLS token). The device packs them (``onevision.device``).
- ``decoder``: the language model with a flat KV cache (``covspec.families.text_export``).

The ``image`` section holds the tiling (tile size, grid pinpoints), the packing
(patches per side, ``vision_aspect_ratio``, the ``image_newline`` vector) and the
normalization. Torch and transformers; imported by the exporter only.
"""

from __future__ import annotations

import numpy as np

from covspec.families.interface import UnsupportedModelError
from covspec.families.llava.export import RESAMPLE_NAMES, LlavaExport


class OnevisionExport(LlavaExport):
    """The ``ExportHalf`` of a loaded LLaVA-OneVision draft."""

    def __init__(self, model, processor):
        config = model.config
        if config.vision_config.model_type != "siglip_vision_model" or config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError(
                f"LLaVA-OneVision with a {config.vision_config.model_type!r} tower and "
                f"{config.vision_feature_select_strategy!r} feature selection is not supported; supported: "
                "siglip_vision_model with 'full' selection.")
        pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]
        if pinpoints != [list(p) for p in config.image_grid_pinpoints]:
            raise UnsupportedModelError("the image processor's image_grid_pinpoints differ from the model config's.")
        super().__init__(model, processor)
        tile = processor.spec["tile"]
        self.input_size = (tile, tile)

    def vision_feeds(self, inputs) -> dict[str, np.ndarray]:
        sizes = inputs["image_sizes"].numpy().astype(np.int64)                     # [1, 2]
        return {"pixel_values": inputs["pixel_values"][0].numpy().astype(np.float32), "image_sizes": sizes}

    def image_section(self) -> dict:
        ip = self.processor.image_processor
        resample = getattr(ip, "resample", 3)
        newline = self.model.model.image_newline.detach().float().numpy()
        return {
            **self.processor.spec,
            "image_newline": [float(x) for x in newline],
            "rescale_factor": float(ip.rescale_factor) if ip.do_rescale else 1.0,
            "mean": [float(x) for x in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
            "std": [float(x) for x in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
            "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
            "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
        }
