"""The LLaVA edge half: load a local folder, render its prompt template, build the
target's context (optionally with pruned visual tokens).

Torch and transformers, imported by the edge, the exporter and the toy world. A
model folder is a standard transformers folder (``LlavaForConditionalGeneration``
weights, ``tokenizer.json`` with a chat template, ``LlavaProcessor`` files);
everything loads offline and ``trust_remote_code`` is never set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covspec.families.common import ProcessorTarget, kept_embeddings
from covspec.families.interface import TargetContext


def load_llava(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


class LlavaTarget(ProcessorTarget):
    """The ``TargetHalf`` of a loaded LLaVA target (LLaVA-OneVision's too: its processor
    adds ``image_sizes``, which the image features take)."""

    def pruned_inputs(self, context: TargetContext) -> dict[str, Any]:
        import torch

        inputs = context.inputs
        sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}   # any-resolution tiling
        features = self.model.get_image_features(pixel_values=inputs["pixel_values"], **sizes)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features
        embeds = kept_embeddings(self.model, inputs["input_ids"][0], features.reshape(-1, features.shape[-1]),
                                 context.keep)[0][None]                                  # [1, L', D]
        return {"inputs_embeds": embeds,
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)}
