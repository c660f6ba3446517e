"""The Qwen2-VL / Qwen2.5-VL edge half: load a local folder, a one-image processor, the target half.

Torch and transformers, imported by the edge and the exporter. The full
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` do not build without torchvision in
transformers 5.24 (their video processor fails), so ``Qwen2VLProcessor`` here stands in
for their one-image path from what does build: the image processor
(``Qwen2VLImageProcessor``, PIL back-end; both families use it), the tokenizer and the
chat template saved in the folder. It expands the prompt's one ``<|image_pad|>`` into
``grid_t * grid_h * grid_w / merge_size**2`` tokens (the processor's
``replace_image_token``) and returns ``mm_token_type_ids`` (1 on image tokens), which
the model needs to compute its 3-D positions.

``Qwen2VLTarget`` is the shared ``ProcessorTarget`` plus M-RoPE: ``next_position(context)`` is the
position of the first generated token, from the model's own ``get_rope_index`` (the
edge passes explicit positions in cached extensions instead of the model's
``rope_deltas``, which is one attribute shared by every session). With ``keep`` (the
opt-in pruned target) the kept visual tokens keep their original 3-D positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from covspec.families.common import ProcessorTarget, kept_embeddings, saved_chat_template
from covspec.families.interface import ModelFolderError, TargetContext

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


class Qwen2VLProcessor:
    """The Qwen2-VL processor for one image per prompt (see the module docstring)."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None, image_token: str, image_token_id: int):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = image_token_id

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text: str = "", return_tensors: str = "pt") -> dict:
        """``input_ids``/``attention_mask``/``mm_token_type_ids`` [1, L] with the image token
        expanded, ``pixel_values`` [patches, C*T*P*P] and ``image_grid_thw`` [1, 3]."""
        if text.count(self.image_token) != (0 if images is None else 1):
            raise ValueError(f"the prompt must hold one {self.image_token!r} for one image.")
        inputs = {}
        if images is not None:
            pixels = self.image_processor(images=images, return_tensors=return_tensors)
            count = int(pixels["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
            text = text.replace(self.image_token, self.image_token * count)
            inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        encoded = dict(self.tokenizer(text, return_tensors=return_tensors))
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).to(encoded["input_ids"].dtype)
        return {**encoded, **inputs}


def load_qwen2vl(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, ``Qwen2VLProcessor``) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    path = Path(path)
    architecture = (json.loads((path / "config.json").read_text()).get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ModelFolderError(f"{path}: architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}.")
    model = getattr(transformers, architecture).from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise ModelFolderError(f"{path} has no image processor files (preprocessor_config.json): {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    return model, Qwen2VLProcessor(image_processor, tokenizer, saved_chat_template(path), image_token,
                                   model.config.image_token_id)


class Qwen2VLTarget(ProcessorTarget):
    """The ``TargetHalf`` of a loaded Qwen2-VL / Qwen2.5-VL target."""

    def rope_positions(self, context: TargetContext):
        """The model's own 3-D positions [3, 1, L] and the next position of the full context."""
        inputs = context.inputs
        positions, deltas = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs.get("attention_mask"))
        return positions, int(inputs["input_ids"].shape[1] + deltas[0, 0])

    def next_position(self, context: TargetContext) -> int:
        """Position (on every axis) of the first token after the context."""
        return self.rope_positions(context)[1]

    def pruned_inputs(self, context: TargetContext) -> dict[str, Any]:
        """Kept visual tokens in their slots with their original 3-D positions (``position_ids``)."""
        import torch

        inputs = context.inputs
        features = self.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features = torch.cat(list(features.pooler_output), dim=0)                       # [N, D]
        embeds, rows = kept_embeddings(self.model, inputs["input_ids"][0], features, context.keep)
        positions = self.rope_positions(context)[0][:, :, rows]                         # [3, 1, L']
        embeds = embeds[None]
        return {"inputs_embeds": embeds, "position_ids": positions,
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)}
