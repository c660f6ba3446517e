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
Each half is imported only when asked for (``LazyFamily``), so importing this package imports
no torch.
"""

from covspec.families.common import LazyFamily

GEMMA3 = LazyFamily("gemma3", ("Gemma3ForConditionalGeneration",),
                    device_half="covspec.families.gemma3.device:Gemma3Device",
                    loader="covspec.families.gemma3.edge:load_gemma3",
                    target_half="covspec.families.gemma3.edge:Gemma3Target",
                    export_half="covspec.families.gemma3.export:Gemma3Export")
