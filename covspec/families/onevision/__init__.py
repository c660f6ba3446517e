"""The LLaVA-OneVision family: ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower,
Qwen2 language model), one image as a base tile plus any-resolution grid tiles,
packed (unpadded, shrunk past ``anyres_max_M``, a newline token per row) into a
variable number of contiguous visual tokens with 1-D positions.

Halves: ``device`` (numpy/PIL/tokenizers: tiling, packing, LLaVA's prompt layout
and draft context), ``edge`` (torch: loading, a one-image processor standing in for
``LlavaOnevisionProcessor``, LLaVA's target half) and ``export`` (torch: the tile
vision graph, the manifest sections). Each half is imported only when asked for,
so importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path


class OnevisionFamily:
    """The ``Family`` of LLaVA-OneVision models (see ``covspec.families.interface.Family``)."""

    name = "onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)

    def device(self, *, image, tokenizer_section, prompt_template, tokenizer, embed_tokens):
        from covspec.families.onevision.device import OnevisionDevice

        return OnevisionDevice(image=image, tokenizer_section=tokenizer_section, prompt_template=prompt_template,
                               tokenizer=tokenizer, embed_tokens=embed_tokens)

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
        from covspec.families.onevision.edge import load_onevision

        return load_onevision(path, device=device, dtype=dtype)

    def target(self, model, processor):
        from covspec.families.llava.edge import LlavaTarget

        return LlavaTarget(model, processor)

    def exporter(self, model, processor):
        from covspec.families.onevision.export import OnevisionExport

        return OnevisionExport(model, processor)


ONEVISION = OnevisionFamily()
