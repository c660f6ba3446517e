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

from covspec.families.common import LazyFamily

ONEVISION = LazyFamily("onevision", ("LlavaOnevisionForConditionalGeneration",),
                       device_half="covspec.families.onevision.device:OnevisionDevice",
                       loader="covspec.families.onevision.edge:load_onevision",
                       target_half="covspec.families.llava.edge:LlavaTarget",
                       export_half="covspec.families.onevision.export:OnevisionExport")
