"""The Gemma 3 edge half: load a local folder, render its prompt template, build the
target's context (optionally with pruned visual tokens).

Torch and transformers, imported by the edge and the exporter. A model folder is a
standard transformers folder (``Gemma3ForConditionalGeneration`` weights,
``tokenizer.json`` with Gemma's chat template, ``Gemma3Processor`` files); everything
loads offline and ``trust_remote_code`` is never set.

- Template: the chat template rendered for one image and ``{question}``; its image
  placeholder is ``<start_of_image>``, which the processor expands to
  ``"\\n\\n<start_of_image>" + mm_tokens_per_image x <image_soft_token> +
  "<end_of_image>\\n\\n"``.
- BOS: the template starts with ``<bos>`` and Gemma's tokenizer adds one too; as the
  processor's ``apply_chat_template`` does, a prompt that already starts with the BOS
  text is tokenized without added special tokens (``add_special_tokens``), so there is
  exactly one BOS. The device half applies the same rule.
- Bidirectional image attention: the context carries the processor's
  ``token_type_ids`` (1 on image tokens), so the prefill lets the image's tokens see
  each other; generated tokens run without them (causal), as in ``generate()``. The
  pruned target passes ``token_type_ids`` for its kept image tokens, which then form
  the image's group.
- Sliding-window layers: transformers' own cache for them keeps only the window and
  cannot be cropped once the window is full, so the edge's rollback would fail past
  it. The context therefore brings a fresh full-length ``DynamicCache`` (``cache``),
  one per context, for callers that run the model on it; ``TargetModel.prefill`` gives
  every prefill a fresh one of its own: every layer keeps every token, and the window
  is applied by the model's attention mask as before (same logits, any length; more
  memory on long contexts).
- Pan-and-scan crops are not supported (the model folder's processor must not ask
  for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covspec.families.common import ProcessorTarget, kept_embeddings
from covspec.families.interface import ModelFolderError, TargetContext


def load_gemma3(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    try:
        processor = Gemma3Processor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        raise ModelFolderError(f"{path}: the Gemma 3 processor files do not load ({exc}).") from None
    if getattr(processor.image_processor, "do_pan_and_scan", False):
        raise ModelFolderError(f"{path}: the image processor asks for pan-and-scan crops, which covspec does not "
                               "support; set do_pan_and_scan to false in its preprocessor config.")
    model = Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    return model, processor


def adds_bos(template: str, bos_text: str | None) -> bool:
    """Whether the tokenizer's own special tokens are added: not when the prompt already
    starts with the BOS text (the processor's ``apply_chat_template`` rule)."""
    return not (bos_text and template.startswith(bos_text))


class Gemma3Target(ProcessorTarget):
    """The ``TargetHalf`` of a loaded Gemma 3 target."""

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.add_special_tokens = adds_bos(self.template, processor.tokenizer.bos_token)

    def placeholders(self) -> set[str]:
        tokenizer = self.processor.tokenizer
        return {self.processor.image_token, tokenizer.image_token, tokenizer.eoi_token}

    def processor_options(self) -> dict[str, Any]:
        return {"add_special_tokens": self.add_special_tokens}

    def context(self, question: str, image, keep: Sequence[int] | None = None,
                template: str | None = None) -> TargetContext:
        from transformers import DynamicCache

        context = super().context(question, image, keep, template)
        context.inputs["cache"] = DynamicCache()        # full length on every layer: see the module docstring
        return context

    def pruned_inputs(self, context: TargetContext) -> dict[str, Any]:
        """Text embeddings (scaled as the model scales them) with the kept visual tokens in
        their slot, the others dropped; the kept ones keep their image group."""
        import torch
        from transformers import DynamicCache

        inputs = context.inputs
        features = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds, rows = kept_embeddings(self.model, inputs["input_ids"][0], features.reshape(-1, features.shape[-1]),
                                       context.keep)
        embeds = embeds[None]
        return {"inputs_embeds": embeds, "token_type_ids": inputs["token_type_ids"][:, rows],
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                "cache": DynamicCache()}
