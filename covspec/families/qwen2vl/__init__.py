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
Each half is imported only when asked for (``LazyFamily``), so importing this package imports
no torch.
"""

from covspec.families.common import LazyFamily

QWEN2VL = LazyFamily("qwen2vl", ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
                     device_half="covspec.families.qwen2vl.device:Qwen2VLDevice",
                     loader="covspec.families.qwen2vl.edge:load_qwen2vl",
                     target_half="covspec.families.qwen2vl.edge:Qwen2VLTarget",
                     export_half="covspec.families.qwen2vl.export:Qwen2VLExport", dynamic_resolution=True)
