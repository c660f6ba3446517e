"""The Idefics3 / SmolVLM family: ``Idefics3ForConditionalGeneration`` and
``SmolVLMForConditionalGeneration`` (SigLIP-like tower on fixed-size tiles,
pixel-shuffle connector, Llama language model). One image becomes ``rows x cols``
tiles plus a global image; the prompt holds one image slot per frame, framed by
``<fake_token_around_image>`` and ``<row_i_col_j>`` / ``<global-img>`` tokens, with
1-D positions.

Halves: ``device`` (numpy/PIL/tokenizers: resizing, splitting, rescale/normalize,
the prompt's expansion, the draft context across tiles), ``edge`` (torch: loading,
the chat template, the target's context and pruned inputs) and ``export`` (torch:
the vision and decoder wrappers, the manifest sections). Each half is imported only
when asked for, so importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path


class Idefics3Family:
    """The ``Family`` of Idefics3 / SmolVLM models (see ``covspec.families.interface.Family``)."""

    name = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")

    def device(self, *, image, tokenizer_section, prompt_template, tokenizer, embed_tokens):
        from covspec.families.idefics3.device import Idefics3Device

        return Idefics3Device(image=image, tokenizer_section=tokenizer_section, prompt_template=prompt_template,
                              tokenizer=tokenizer, embed_tokens=embed_tokens)

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
        from covspec.families.idefics3.edge import load_idefics3

        return load_idefics3(path, device=device, dtype=dtype)

    def target(self, model, processor):
        from covspec.families.idefics3.edge import Idefics3Target

        return Idefics3Target(model, processor)

    def exporter(self, model, processor):
        from covspec.families.idefics3.export import Idefics3Export

        return Idefics3Export(model, processor)


IDEFICS3 = Idefics3Family()
