"""The LLaVA-OneVision edge half: load a local folder, and a single-image processor.

Torch and transformers, imported by the edge and the exporter. The full
``LlavaOnevisionProcessor`` does not build without torchvision in transformers 5.24
(its video processor fails), so ``OnevisionProcessor`` stands in for its one-image
path from what does build: the image processor (``LlavaOnevisionImageProcessor``,
PIL back-end), the tokenizer and the processor's chat template
(``chat_template.jinja`` or ``chat_template.json`` in the folder, else the
tokenizer's). It expands the prompt's one image token into the image's visual token
count, computed by the device half's ``image_token_count`` (the model's own
``pack_image_features`` logic; the tests hold both to the model). The target half is
LLaVA's (``LlavaTarget``) around this processor.
"""

from __future__ import annotations

from pathlib import Path

from covspec.families.common import saved_chat_template
from covspec.families.interface import ModelFolderError
from covspec.families.onevision.device import image_token_count


def image_spec(model, image_processor) -> dict:
    """What tiling and packing need of the image processor and the model config (the
    numpy functions of ``onevision.device`` take it)."""
    config, vision = model.config, model.config.vision_config
    size = image_processor.size
    tile = size["height"] if isinstance(size, dict) else size.height
    return {"tile": int(tile), "side": vision.image_size // vision.patch_size,
            "grid_pinpoints": [[int(h), int(w)] for h, w in image_processor.image_grid_pinpoints],
            "vision_aspect_ratio": config.vision_aspect_ratio}


class OnevisionProcessor:
    """``LlavaOnevisionProcessor`` for one image per prompt (see the module docstring)."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None, spec: dict, image_token: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.spec = spec
        self.image_token = image_token

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text: str = "", return_tensors: str = "pt") -> dict:
        """``input_ids``/``attention_mask`` [1, L] with the image token expanded, ``pixel_values``
        [1, T, 3, tile, tile] and ``image_sizes`` [1, 2] (height, width)."""
        if text.count(self.image_token) != (0 if images is None else 1):
            raise ValueError(f"the prompt must hold one {self.image_token!r} for one image.")
        inputs = {}
        if images is not None:
            pixels = self.image_processor(images=images, return_tensors=return_tensors)
            height, width = (int(x) for x in pixels["image_sizes"][0])
            text = text.replace(self.image_token, self.image_token * image_token_count(height, width, self.spec))
            inputs = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
        return {**dict(self.tokenizer(text, return_tensors=return_tensors)), **inputs}


def load_onevision(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, ``OnevisionProcessor``) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
    from transformers import LlavaOnevisionImageProcessorPil

    path = Path(path)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    try:
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise ModelFolderError(f"{path} has no image processor files (preprocessor_config.json): {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    return model, OnevisionProcessor(image_processor, tokenizer, saved_chat_template(path),
                                     image_spec(model, image_processor), image_token)
