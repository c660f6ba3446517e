"""The Idefics3 / SmolVLM edge half: load a local folder, render its prompt template,
build the target's context (optionally with pruned visual tokens).

Torch and transformers, imported by the edge and the exporter. A model folder is a
standard transformers folder (``Idefics3ForConditionalGeneration`` or
``SmolVLMForConditionalGeneration`` weights, ``tokenizer.json`` with a chat
template, the processor files); everything loads offline and ``trust_remote_code``
is never set. Both architectures are processed by ``Idefics3Processor``: a SmolVLM
folder's image processor (``SmolVLMImageProcessor``, the same resizing and
splitting) and tokenizer load into it, and its image prompt expansion is the same
text as ``SmolVLMProcessor``'s, which cannot be built here (it needs ``num2words``
and a video processor). The device half never needs a processor.

The context is the processor's: one image becomes ``rows x cols`` tiles plus a global
image, each ``image_seq_len`` image tokens with row/column tokens around them. The
visual tokens are numbered 0..N-1 in prompt order across all tiles (as the draft
numbers them); the opt-in pruned target keeps any subset of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from covspec.families.common import ProcessorTarget, kept_embeddings
from covspec.families.interface import ModelFolderError, TargetContext

CLASSES = {"Idefics3ForConditionalGeneration": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
           "SmolVLMForConditionalGeneration": ("SmolVLMForConditionalGeneration", "Idefics3Processor")}


def load_idefics3(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    import transformers

    architecture = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or ["?"])[0]
    if architecture not in CLASSES:
        raise ModelFolderError(f"{path}: architecture {architecture!r} is not one of {', '.join(CLASSES)}.")
    model_class, processor_class = (getattr(transformers, name) for name in CLASSES[architecture])
    try:
        processor = processor_class.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelFolderError(f"{path}: the processor files do not load ({exc}).") from None
    model = model_class.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    return model, processor


class Idefics3Target(ProcessorTarget):
    """The ``TargetHalf`` of a loaded Idefics3 / SmolVLM target."""

    def pruned_inputs(self, context: TargetContext) -> dict[str, Any]:
        """Text embeddings with every kept visual token in its slot and the others dropped."""
        import torch

        inputs = context.inputs
        features = self.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                 pixel_attention_mask=inputs.get("pixel_attention_mask"))
        features = torch.cat(list(features.pooler_output), dim=0)                       # [N, D]
        embeds = kept_embeddings(self.model, inputs["input_ids"][0], features, context.keep)[0][None]
        return {"inputs_embeds": embeds,
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)}
