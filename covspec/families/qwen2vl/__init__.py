"""The Qwen2-VL / Qwen2.5-VL family: ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration`` (a ViT on dynamic-resolution patches with 2-D
rotary positions, Qwen2.5: window attention; a 2x2 patch merger; a Qwen2 language
model with 3-D M-RoPE positions).

Dynamic resolution: the target sees each image at its processor's resolution (a
variable number of visual tokens); the draft's vision graph is exported at one fixed
size (``covspec export --image-size``; this family's ``dynamic_resolution``), to which
the device resizes every image, so the draft's visual token count is fixed. The 3-D
positions of the draft's context are computed on the device in numpy, equal to the
model's ``get_rope_index``, and pruned visual tokens keep theirs.

Halves: ``device`` (numpy/PIL/tokenizers: resize, patchify, prompt layout, M-RoPE
positions, draft context), ``edge`` (torch: loading, a one-image processor standing
in for ``Qwen2VLProcessor``, the target half with explicit positions) and ``export``
(torch: the fixed-grid vision graph, the M-RoPE decoder, the manifest sections).
Each half is imported only when asked for, so importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path


class Qwen2VLFamily:
    """The ``Family`` of Qwen2-VL / Qwen2.5-VL models (see ``covspec.families.interface.Family``)."""

    name = "qwen2vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    dynamic_resolution = True   # the exporter takes ``image_size`` (width, height)

    def device(self, *, image, tokenizer_section, prompt_template, tokenizer, embed_tokens):
        from covspec.families.qwen2vl.device import Qwen2VLDevice

        return Qwen2VLDevice(image=image, tokenizer_section=tokenizer_section, prompt_template=prompt_template,
                             tokenizer=tokenizer, embed_tokens=embed_tokens)

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
        from covspec.families.qwen2vl.edge import load_qwen2vl

        return load_qwen2vl(path, device=device, dtype=dtype)

    def target(self, model, processor):
        from covspec.families.qwen2vl.edge import Qwen2VLTarget

        return Qwen2VLTarget(model, processor)

    def exporter(self, model, processor, image_size: tuple[int, int] | None = None):
        from covspec.families.qwen2vl.export import Qwen2VLExport

        return Qwen2VLExport(model, processor, image_size)


QWEN2VL = Qwen2VLFamily()
