"""The Gemma 3 export half: the vision and decoder wrappers, and the manifest sections.

Supported: ``Gemma3ForConditionalGeneration`` (a SigLIP tower, Gemma 3's avg-pool
projector, a Gemma 3 language model), without pan-and-scan crops and without
``use_bidirectional_attention`` (a text-embedding variant). Graphs:

- ``vision``: ``pixel_values [B,3,S,S] -> image_features [B,N,D], activity [B,N]``:
  the tower's last hidden state average-pooled to N = ``mm_tokens_per_image`` tokens
  (256 for the real models) and projected (``get_image_features``); activity is the
  L2 norm of each token's feature (the tower has no CLS token).
- ``decoder`` (``Gemma3Decoder``): ``inputs_embeds [B,S,D], attention_mask [B,P+S],
  position_ids [B,S], image_groups [B,S], past_key_values.{i}.key/value [B,KVH,P,HD]
  -> logits [B,S,V], present.{i}.key/value [B,KVH,P+S,HD]``. The mask is the model's
  own: causal from cache positions, OR query and key in the same image group k > 0
  (the call's tokens only; the processor's ``token_type_ids`` blocks), AND for
  sliding-window layers the window over cache positions (key > query - window). The
  window is applied, not refused: every layer's cache keeps every token (a plain
  ``DynamicCache``) and the mask hides what the window drops, so the graph is exact at
  any context length. The embedding table written for the device is the model's,
  multiplied by its normalizer sqrt(hidden) as ``Gemma3TextScaledWordEmbedding`` does
  in the model's dtype; visual tokens are not scaled (as in the model).

Torch and transformers; imported by the exporter only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from covspec.families.common import prompt_template
from covspec.families.interface import GraphTrace, UnsupportedModelError
from covspec.families.text_export import decoder_graph, decoder_spec, tokenizer_section

RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
TRACE_BATCH = 2      # trace with batch >= 2, so the batch size stays dynamic


class Gemma3Vision(nn.Module):
    """SigLIP tower + avg-pool projector of a Gemma 3 model, with the feature-norm activity."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.get_image_features(pixel_values).pooler_output             # [B, N, D]
        return features, features.norm(dim=-1)


class Gemma3Decoder(nn.Module):
    """The Gemma 3 language model + LM head with a flat KV cache and the image-group mask."""

    def __init__(self, language_model, lm_head, text_config):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.sliding_window = int(text_config.sliding_window)

    def forward(self, inputs_embeds, attention_mask, position_ids, image_groups, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
        query, total = inputs_embeds.shape[1], attention_mask.shape[1]
        # Query j sits at cache position total - query + j.
        key_pos = torch.arange(total, device=inputs_embeds.device)
        query_pos = torch.arange(query, device=inputs_embeds.device) + (total - query)
        causal = key_pos[None, :] <= query_pos[:, None]                                 # [S, T]
        key_groups = torch.cat([torch.zeros_like(attention_mask[:, :total - query]), image_groups], dim=1)
        same_image = (image_groups[:, :, None] == key_groups[:, None, :]) & (image_groups[:, :, None] > 0)
        allowed = (causal[None] | same_image) & attention_mask[:, None, :].bool()         # [B, S, T]
        window = key_pos[None, :] > query_pos[:, None] - self.sliding_window            # [S, T]
        masks = {"full_attention": self._additive(allowed, inputs_embeds.dtype),
                 "sliding_attention": self._additive(allowed & window[None], inputs_embeds.dtype)}
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=position_ids,
                                  cache=cache, use_cache=True, return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        presents = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
        """[B, S, T] bool -> [B, 1, S, T] additive mask (0 or the dtype's minimum)."""
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def gemma3_decoder_graph(decoder: Gemma3Decoder, spec) -> GraphTrace:
    """The shared decoder trace (``text_export.decoder_graph``) with ``image_groups`` after
    ``position_ids``: two images' groups and text, so no value is a constant."""
    base = decoder_graph(decoder, spec)
    embeds, mask, positions, *caches = base.args
    groups = torch.tensor([[0, 1, 1], [2, 2, 0]], dtype=torch.int64)[:embeds.shape[0], :embeds.shape[1]]
    names = base.input_names[:3] + ["image_groups"] + base.input_names[3:]
    axes = {**base.axes, "image_groups": dict(base.axes["position_ids"])}
    dims = (*base.dims[:3], base.dims[2], base.dims[3])
    return GraphTrace(decoder, (embeds, mask, positions, groups, *caches), names, base.output_names, axes, dims)


def image_sequence(processor) -> tuple[str, str]:
    """The text the processor puts before and after the image's run of image tokens."""
    image_token = processor.tokenizer.image_token
    full = processor.full_image_sequence
    run = image_token * int(processor.image_seq_length)
    if full.count(run) != 1 or image_token in full.replace(run, ""):
        raise UnsupportedModelError("the Gemma 3 processor's image sequence is not one run of image tokens.")
    before, after = full.split(run)
    return before, after


class Gemma3Export:
    """The ``ExportHalf`` of a loaded Gemma 3 draft."""

    def __init__(self, model, processor):
        config = model.config
        text, vision = config.text_config, config.vision_config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention (a text-embedding model) is not a "
                                        "generative draft.")
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise UnsupportedModelError("Gemma 3 pan-and-scan crops are not supported; export with "
                                        "do_pan_and_scan disabled.")
        if int(processor.image_seq_length) != int(config.mm_tokens_per_image):
            raise UnsupportedModelError(f"the processor expands {processor.image_seq_length} image tokens but the "
                                        f"model makes {config.mm_tokens_per_image}.")
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)
        self.vision = Gemma3Vision(model).eval()
        self.decoder = Gemma3Decoder(model.model.language_model, model.lm_head, text).eval()
        self.decoder_spec = decoder_spec(text, model.lm_head.out_features)
        self.input_size = (int(vision.image_size), int(vision.image_size))

    def vision_graph(self) -> GraphTrace:
        side = self.input_size[0]
        pixel_values = torch.randn(TRACE_BATCH, self.model.config.vision_config.num_channels, side, side)
        axes = {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}, "activity": {0: "batch"}}
        return GraphTrace(self.vision, (pixel_values,), ["pixel_values"], ["image_features", "activity"], axes,
                          ({0: Dim("batch", min=1, max=1024)},))

    def decoder_graph(self) -> GraphTrace:
        return gemma3_decoder_graph(self.decoder, self.decoder_spec)

    def embed_tokens(self) -> np.ndarray:
        embedding = self.model.get_input_embeddings()
        scale = embedding.embed_scale.to(embedding.weight.dtype)
        return (embedding.weight.detach() * scale).float().numpy().astype(np.float32)

    def processor_inputs(self, image, question: str) -> dict:
        """The processor on the chat of one image and ``question`` (``apply_chat_template``,
        the model card's way; one BOS)."""
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question.strip()}]}]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        return dict(inputs)

    def vision_feeds(self, inputs) -> dict[str, np.ndarray]:
        if inputs["pixel_values"].shape[0] != 1:
            raise UnsupportedModelError("the vision graph takes one image per prompt (no pan-and-scan crops).")
        return {"pixel_values": inputs["pixel_values"].numpy().astype(np.float32)}

    def image_section(self) -> dict:
        ip, processor = self.processor.image_processor, self.processor
        size = ip.size if isinstance(ip.size, dict) else {"height": ip.size.height, "width": ip.size.width}
        resample = getattr(ip, "resample", 2)
        before, after = image_sequence(processor)
        return {
            "size": [int(size["height"]), int(size["width"])],
            "resize": {"height": int(size["height"]), "width": int(size["width"])},
            "crop_size": None,
            "do_center_crop": False,
            "rescale_factor": float(ip.rescale_factor) if ip.do_rescale else 1.0,
            "mean": [float(x) for x in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
            "std": [float(x) for x in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
            "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
            "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", None) is not False),
            "image_seq_len": int(processor.image_seq_length),
            "placeholder": processor.image_token,
            "image_token": processor.tokenizer.image_token,
            "image_text_before": before,
            "image_text_after": after,
        }

    def tokenizer_section(self, tokenizer_file: Path) -> dict:
        return tokenizer_section(self.model, self.processor, tokenizer_file, self.model.config.image_token_id)

    def source_section(self) -> dict:
        config = self.model.config
        text = config.text_config
        return {"architecture": type(self.model).__name__, "text_model_type": text.model_type,
                "vision_model_type": config.vision_config.model_type,
                "mm_tokens_per_image": int(config.mm_tokens_per_image), "sliding_window": int(text.sliding_window),
                "layer_types": list(text.layer_types)}
