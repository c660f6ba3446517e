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
when asked for (``LazyFamily``), so importing this package imports no torch.
"""

from covspec.families.common import LazyFamily

IDEFICS3 = LazyFamily("idefics3", ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
                      device_half="covspec.families.idefics3.device:Idefics3Device",
                      loader="covspec.families.idefics3.edge:load_idefics3",
                      target_half="covspec.families.idefics3.edge:Idefics3Target",
                      export_half="covspec.families.idefics3.export:Idefics3Export")
