"""The LLaVA family: ``LlavaForConditionalGeneration`` (CLIP or SigLIP tower, Llama,
Mistral or Qwen2 language model), one image expanded into N contiguous visual tokens
with 1-D positions.

Halves: ``device`` (numpy/PIL/tokenizers: the processor's own resize, CLIP's shortest
edge + center crop or SigLIP's fixed square without a crop; the prompt split at its
one image token; the draft context), ``edge`` (torch: loading, the chat template, the
target's context and pruned inputs) and ``export`` (torch: the vision and decoder
wrappers, the manifest sections). Each half is imported only
when asked for, so importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path


class LlavaFamily:
    """The ``Family`` of LLaVA models (see ``covspec.families.interface.Family``)."""

    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def device(self, *, image, tokenizer_section, prompt_template, tokenizer, embed_tokens):
        from covspec.families.llava.device import LlavaDevice

        return LlavaDevice(image=image, tokenizer_section=tokenizer_section, prompt_template=prompt_template,
                           tokenizer=tokenizer, embed_tokens=embed_tokens)

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
        from covspec.families.llava.edge import load_llava

        return load_llava(path, device=device, dtype=dtype)

    def target(self, model, processor):
        from covspec.families.llava.edge import LlavaTarget

        return LlavaTarget(model, processor)

    def exporter(self, model, processor):
        from covspec.families.llava.export import LlavaExport

        return LlavaExport(model, processor)


LLAVA = LlavaFamily()
