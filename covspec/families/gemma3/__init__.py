"""The Gemma 3 family: ``Gemma3ForConditionalGeneration`` (a SigLIP tower on fixed
896-pixel images, average-pooled to 256 tokens and projected; a Gemma 3 language model
with sliding-window layers interleaved with global ones). What is new for covspec:
the image's tokens attend to each other bidirectionally inside the language model (the
draft's decoder graph takes ``image_groups`` and reproduces the model's mask), the
sliding window is applied in the exported decoder, token embeddings are scaled by
sqrt(hidden), and the prompt's BOS follows the processor's chat-template rule. 1-D
positions.

Halves: ``device`` (numpy/PIL/tokenizers: the fixed resize, the prompt's image
expansion, the draft context with its image group), ``edge`` (torch: loading, the chat
template, the target's context with ``token_type_ids`` and a full-length cache, pruned
inputs) and ``export`` (torch: the vision and decoder wrappers, the manifest sections).
Each half is imported only when asked for, so importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path


class Gemma3Family:
    """The ``Family`` of Gemma 3 models (see ``covspec.families.interface.Family``)."""

    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)

    def device(self, *, image, tokenizer_section, prompt_template, tokenizer, embed_tokens):
        from covspec.families.gemma3.device import Gemma3Device

        return Gemma3Device(image=image, tokenizer_section=tokenizer_section, prompt_template=prompt_template,
                            tokenizer=tokenizer, embed_tokens=embed_tokens)

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
        from covspec.families.gemma3.edge import load_gemma3

        return load_gemma3(path, device=device, dtype=dtype)

    def target(self, model, processor):
        from covspec.families.gemma3.edge import Gemma3Target

        return Gemma3Target(model, processor)

    def exporter(self, model, processor):
        from covspec.families.gemma3.export import Gemma3Export

        return Gemma3Export(model, processor)


GEMMA3 = Gemma3Family()
