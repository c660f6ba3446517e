"""The Idefics3 / SmolVLM export half: the vision graph over all tiles at once, the
decoder, and the manifest sections.

Supported: ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``
with a Llama language model (SmolLM2, Llama 3) whose tiles are the vision tower's own
input size (``max_image_size.longest_edge == vision_config.image_size``, as in every
released checkpoint). Graphs:

- ``vision``: ``pixel_values [T,3,S,S] -> image_features [1,T*Q,D], activity [1,T*Q]``:
  the T frames of one image (its tiles in row-major order, then the global image) at
  the fixed tile size S, through the SigLIP-like tower (full patch mask: the patch
  position ids are those the model computes for an unpadded tile, baked in as a
  constant), the post-layernorm and the pixel-shuffle connector (Q = image_seq_len
  tokens per frame), flattened in prompt order. The tower has no CLS token: the
  activity is the L2 norm of each visual token's feature. T is dynamic.
- ``decoder``: the language model with a flat KV cache (``covspec.families.text_export``).

The parity feeds carry the image's grid (``image_grid``, read from the processor's
row/column tokens) as the device's preprocessing does (see ``device.py``).

Torch and transformers; imported by the exporter only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from covspec.families.common import fill_prompt, prompt_template
from covspec.families.interface import GraphTrace, UnsupportedModelError
from covspec.families.text_export import FlatCacheDecoder, decoder_graph, decoder_spec, tokenizer_section

SUPPORTED_TEXT = ("llama",)
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
TRACE_FRAMES = 3     # trace with several frames, so the frame count stays dynamic


class Idefics3Vision(nn.Module):
    """Vision tower + connector of an Idefics3 / SmolVLM model on unpadded tiles, with
    the per-token activity (feature norm)."""

    def __init__(self, model):
        super().__init__()
        vision = model.model.vision_model
        self.patch_embedding = vision.embeddings.patch_embedding
        self.position_embedding = vision.embeddings.position_embedding
        self.encoder = vision.encoder
        self.post_layernorm = vision.post_layernorm
        self.connector = model.model.connector
        config = model.config.vision_config
        side = config.image_size // config.patch_size
        self.register_buffer("position_ids", _tile_position_ids(vision.embeddings, config.image_size, side),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)      # [T, P, C]
        hidden = patches + self.position_embedding(self.position_ids)
        hidden = self.post_layernorm(self.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state)
        features = self.connector(hidden)                                           # [T, Q, D]
        features = features.reshape(1, -1, features.shape[-1])                      # [1, T*Q, D]
        return features, features.norm(dim=-1)


def _tile_position_ids(embeddings, image_size: int, side: int) -> torch.Tensor:
    """The patch position ids [1, side*side] the model's own embeddings use for a full tile
    (taken from a real forward, so they equal the model's bucketized ids exactly)."""
    seen = []
    hook = embeddings.position_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            embeddings(torch.zeros(1, 3, image_size, image_size), torch.ones(1, side, side, dtype=torch.bool))
    finally:
        hook.remove()
    return seen[0].clone()


class Idefics3Export:
    """The ``ExportHalf`` of a loaded Idefics3 / SmolVLM draft."""

    def __init__(self, model, processor):
        config = model.config
        text, vision = config.text_config, config.vision_config
        if text.model_type not in SUPPORTED_TEXT:
            raise UnsupportedModelError(f"Idefics3 language model {text.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_TEXT)}.")
        ip = processor.image_processor
        self.tile = int(ip.max_image_size["longest_edge"])
        if self.tile != vision.image_size:
            raise UnsupportedModelError(f"the processor's tiles are {self.tile} px but the vision tower takes "
                                        f"{vision.image_size} px images; only equal sizes are supported.")
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)
        self.vision = Idefics3Vision(model).eval()
        self.decoder = FlatCacheDecoder(model.model.text_model, model.lm_head, text).eval()
        self.decoder_spec = decoder_spec(text, model.get_input_embeddings().weight.shape[0])
        self.input_size = (self.tile, self.tile)

    def vision_graph(self) -> GraphTrace:
        pixel_values = torch.randn(TRACE_FRAMES, self.model.config.vision_config.num_channels, self.tile, self.tile)
        axes = {"pixel_values": {0: "frames"}, "image_features": {1: "tokens"}, "activity": {1: "tokens"}}
        return GraphTrace(self.vision, (pixel_values,), ["pixel_values"], ["image_features", "activity"], axes,
                          ({0: Dim("frames", min=1, max=1024)},))

    def decoder_graph(self) -> GraphTrace:
        return decoder_graph(self.decoder, self.decoder_spec)

    def embed_tokens(self) -> np.ndarray:
        return self.model.get_input_embeddings().weight.detach().float().numpy().astype(np.float32)

    def processor_inputs(self, image, question: str) -> dict:
        return dict(self.processor(images=image, text=fill_prompt(self.template, question),
                                   return_tensors="pt"))

    def vision_feeds(self, inputs) -> dict[str, np.ndarray]:
        pixels = inputs["pixel_values"]
        if pixels.shape[0] != 1 or not bool(inputs["pixel_attention_mask"].all()):
            raise UnsupportedModelError("the vision graph takes one unpadded image per prompt.")
        return {"pixel_values": pixels[0].numpy().astype(np.float32),
                "image_grid": np.asarray(self.grid_of(inputs["input_ids"][0].tolist()), dtype=np.int64)}

    def grid_of(self, ids: list[int]) -> tuple[int, int]:
        """(rows, cols) of the image in a processed prompt, read from its ``<row_i_col_j>`` tokens."""
        vocab, present = self.processor.tokenizer.get_vocab(), set(ids)
        cells = [(i, j) for i in range(1, 7) for j in range(1, 7) if vocab.get(f"<row_{i}_col_{j}>", -1) in present]
        return (max(i for i, _ in cells), max(j for _, j in cells)) if cells else (0, 0)

    def image_section(self) -> dict:
        ip, processor = self.processor.image_processor, self.processor
        resample = getattr(ip, "resample", 1)
        size = ip.size if isinstance(ip.size, dict) else {"longest_edge": getattr(ip.size, "longest_edge", None)}
        return {
            "size": [self.tile, self.tile],
            "tile": self.tile,
            "longest_edge": int(size["longest_edge"]),
            "do_resize": bool(ip.do_resize),
            "do_image_splitting": bool(ip.do_image_splitting),
            "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
            "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
            "do_rescale": bool(ip.do_rescale),
            "rescale_factor": float(ip.rescale_factor),
            "do_normalize": bool(ip.do_normalize),
            "mean": [float(x) for x in ip.image_mean],
            "std": [float(x) for x in ip.image_std],
            "image_seq_len": int(processor.image_seq_len),
            "image_token": processor.image_token,
            "fake_image_token": processor.fake_image_token,
            "global_image_token": getattr(processor, "global_image_tag", None) or processor.global_image_token,
        }

    def tokenizer_section(self, tokenizer_file: Path) -> dict:
        return tokenizer_section(self.model, self.processor, tokenizer_file, self.model.config.image_token_id)

    def source_section(self) -> dict:
        config = self.model.config
        return {"architecture": type(self.model).__name__, "text_model_type": config.text_config.model_type,
                "vision_model_type": config.vision_config.model_type, "scale_factor": int(config.scale_factor)}
