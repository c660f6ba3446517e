"""The Gemma 3 device half: image preprocessing, prompt layout, draft context with the
image's bidirectional group.

Numpy, PIL and tokenizers only; never imports torch or transformers.

- Preprocessing, as the manifest's ``image`` section says (the export half writes it
  from the model's ``Gemma3ImageProcessor``): RGB, a fixed square resize (PIL,
  bilinear for Gemma 3) to the tower's size (896 px for the real models), rescale,
  normalize; ``pixel_values`` float32 [1, 3, S, S]. The same steps as LLaVA's SigLIP
  tower, so the LLaVA device half's ``pixel_values`` does them. Pan-and-scan crops are
  not supported (the export refuses a processor that asks for them).
- Prompt layout: the template filled with the question, its one ``<start_of_image>``
  expanded as ``Gemma3Processor`` expands it (``image_text_before`` + ``image_seq_len``
  image tokens + ``image_text_after``, i.e. ``"\\n\\n<start_of_image>"``,
  ``<image_soft_token>`` x 256, ``"<end_of_image>\\n\\n"`` for the real models), tokenized
  whole, with the tokenizer's own special tokens only when the template does not
  already start with the BOS token (the processor's ``apply_chat_template`` rule: one
  BOS), and split at the run of image tokens.
- Draft context: the prompt's text embeddings (the embedding table is exported already
  multiplied by Gemma's normalizer sqrt(hidden)) around the kept visual tokens, 1-D
  positions, and ``image_groups``: 1 on every kept visual token, 0 on text. The draft's
  decoder lets a group's tokens see each other (as the model does with the
  processor's ``token_type_ids``), so pruned-away tokens simply leave the group.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from covspec.families.common import QUESTION_SLOT, fill_prompt, require_image_keys
from covspec.families.interface import POSITIONS, DeviceHalf, DraftContext, PromptLayout
from covspec.families.llava.device import pixel_values
from covspec.protocol.manifest import ArtifactError

IMAGE_KEYS = ("size", "resize", "crop_size", "do_center_crop", "rescale_factor", "mean", "std", "resample",
              "do_convert_rgb", "image_seq_len", "placeholder", "image_token", "image_text_before",
              "image_text_after")


class Gemma3Device(DeviceHalf):
    """The ``DeviceHalf`` of a Gemma 3 draft artifact."""

    def __init__(self, *, image: Mapping, tokenizer_section: Mapping, prompt_template: str, tokenizer,
                 embed_tokens: np.ndarray):
        require_image_keys(image, IMAGE_KEYS)
        if prompt_template.count(image["placeholder"]) != 1 or prompt_template.count(QUESTION_SLOT) != 1:
            raise ArtifactError(f"the prompt template must contain one {image['placeholder']} and one {{question}}.")
        self.image = dict(image)
        self.image_token_id = int(tokenizer_section["image_token_id"])
        self.template = prompt_template
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens                                      # [V, D], scaled
        bos = tokenizer_section.get("bos_id")
        bos_text = tokenizer.id_to_token(int(bos)) if bos is not None else None
        self.add_special_tokens = not (bos_text and prompt_template.startswith(bos_text))

    def vision_inputs(self, image: Image.Image) -> dict[str, np.ndarray]:
        pixels = pixel_values(image, self.image)
        if list(pixels.shape[2:]) != list(self.image["size"]):
            raise ArtifactError(f"the manifest's image preprocessing gives {pixels.shape[3]}x{pixels.shape[2]} "
                                f"pixels, but the vision tower takes {self.image['size'][1]}x{self.image['size'][0]}:"
                                " the artifact's 'image' section does not describe its model's processor.")
        return {"pixel_values": pixels}

    def prompt_layout(self, question: str, feeds=None, template: str | None = None) -> PromptLayout:
        spec = self.image
        for token in (spec["placeholder"], spec["image_token"]):
            if token in question:
                raise ArtifactError(f"the question contains {token!r}; send the question text only, the prompt "
                                    "places the image itself.")
        seq = int(spec["image_seq_len"])
        text = fill_prompt(template or self.template, question)
        text = text.replace(spec["placeholder"],
                            spec["image_text_before"] + spec["image_token"] * seq + spec["image_text_after"])
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids, np.int64)
        at = np.flatnonzero(ids == self.image_token_id)
        if len(at) != seq or (seq and at[-1] - at[0] != seq - 1):
            raise ArtifactError(f"the expanded prompt holds {len(at)} image tokens, expected one run of {seq}: the "
                                "tokenizer does not keep the image tokens whole.")
        start = int(at[0]) if seq else len(ids)
        return PromptLayout(segments=(tuple(ids[:start].tolist()), tuple(ids[start + seq:].tolist())))

    def draft_context(self, layout: PromptLayout, image_features: np.ndarray, kept: np.ndarray,
                      positions: str) -> DraftContext:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}.")
        before, after = layout.segments
        n = image_features.shape[0]
        if n != int(self.image["image_seq_len"]):
            raise ArtifactError(f"the vision graph gave {n} visual tokens, the prompt holds "
                                f"{self.image['image_seq_len']}: the features come from another model.")
        kept = np.unique(np.asarray(kept, dtype=np.int64))                                   # [K] ascending
        embeds = np.concatenate([self.embed_tokens[np.asarray(before, dtype=np.int64)], image_features[kept],
                                 self.embed_tokens[np.asarray(after, dtype=np.int64)]]).astype(np.float32)
        groups = np.concatenate([np.zeros(len(before), np.int64), np.ones(len(kept), np.int64),
                                 np.zeros(len(after), np.int64)])
        if positions == "original":
            ids = np.concatenate([np.arange(len(before)), len(before) + kept, len(before) + n + np.arange(len(after))])
            return DraftContext(embeds, ids.astype(np.int64), len(before) + n + len(after), image_groups=groups)
        return DraftContext(embeds, np.arange(len(embeds), dtype=np.int64), len(embeds), image_groups=groups)
