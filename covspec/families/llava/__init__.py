"""The LLaVA family: ``LlavaForConditionalGeneration`` (CLIP or SigLIP tower, Llama,
Mistral or Qwen2 language model), one image expanded into N contiguous visual tokens
with 1-D positions.

Halves: ``device`` (numpy/PIL/tokenizers: the processor's own resize, CLIP's shortest
edge + center crop or SigLIP's fixed square without a crop; the prompt split at its
one image token; the draft context), ``edge`` (torch: loading, the chat template, the
target's context and pruned inputs) and ``export`` (torch: the vision and decoder
wrappers, the manifest sections). Each half is imported only
when asked for (``LazyFamily``), so importing this package imports no torch.
"""

from covspec.families.common import LazyFamily

LLAVA = LazyFamily("llava", ("LlavaForConditionalGeneration",),
                   device_half="covspec.families.llava.device:LlavaDevice",
                   loader="covspec.families.llava.edge:load_llava",
                   target_half="covspec.families.llava.edge:LlavaTarget",
                   export_half="covspec.families.llava.export:LlavaExport")
