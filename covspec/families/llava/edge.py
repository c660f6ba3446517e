"""The LLaVA edge half: load a local folder, render its prompt template, build the
target's context (optionally with pruned visual tokens).

Torch and transformers, imported by the edge, the exporter and the toy world. A
model folder is a standard transformers folder (``LlavaForConditionalGeneration``
weights, ``tokenizer.json`` with a chat template, ``LlavaProcessor`` files);
everything loads offline and ``trust_remote_code`` is never set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covspec.families.common import generation_eos_ids, prompt_template, target_context
from covspec.families.interface import TargetContext


def load_llava(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


class LlavaTarget:
    """The ``TargetHalf`` of a loaded LLaVA target."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)

    def context(self, question: str, image, keep: Sequence[int] | None = None) -> TargetContext:
        return target_context(self.model, self.processor, self.template.format(question=question), question, image,
                              keep, [self.processor.image_token])

    def pruned_inputs(self, context: TargetContext) -> dict[str, Any]:
        import torch

        inputs = context.inputs
        ids = inputs["input_ids"][0]
        is_image = ids == self.model.config.image_token_id
        sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}   # any-resolution tiling
        features = self.model.get_image_features(pixel_values=inputs["pixel_values"], **sizes)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features
        features = features.reshape(-1, features.shape[-1])[context.keep]              # [K, D]
        start = int(torch.nonzero(is_image)[0])
        text = self.model.get_input_embeddings()(ids[None])[0]                          # [L, D]
        visual = int(is_image.sum())
        embeds = torch.cat([text[:start], features.to(text.dtype), text[start + visual:]])[None]
        return {"inputs_embeds": embeds,
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)}

    def eos_ids(self) -> set[int]:
        return generation_eos_ids(self.model, self.processor.tokenizer)

    def vocab(self) -> dict[str, int]:
        return self.processor.tokenizer.get_vocab()
