"""The LLaVA export half: flat-signature wrappers for tracing, and the manifest sections.

Supported: ``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower and
a Llama, Mistral or Qwen2 language model. Graphs:

- ``vision``: ``pixel_values [B,3,H,W] -> image_features [B,N,D], activity [B,N]``:
  the vision tower and projector exactly as the model selects them (feature layer(s),
  CLS dropped for the "default" strategy), and the attention the CLS token pays to
  each selected token (mean over heads, at the last layer the model uses). Towers
  without a CLS token (SigLIP) use the L2 norm of each token's feature instead.
- ``decoder``: ``inputs_embeds [B,S,D], attention_mask [B,P+S], position_ids [B,S],
  past_key_values.{i}.key/value [B,KVH,P,HD] -> logits [B,S,V], present.{i}.key/value
  [B,KVH,P+S,HD]``. The causal mask is built from cache positions (queries sit at
  P..P+S-1), so ``position_ids`` may skip values (pruned visual tokens keep their
  original positions). Sliding-window attention (Mistral, Qwen2 with
  ``use_sliding_window``) is not applied: contexts must stay within the window.

Torch and transformers; imported by the exporter only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from covspec.families.interface import DecoderSpec, GraphTrace, UnsupportedModelError, past_names, present_names
from covspec.families.llava.edge import prompt_template

SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Tracing sizes: batch >= 2, past and query lengths that are neither 0 nor 1.
TRACE_BATCH, TRACE_PAST, TRACE_QUERY = 2, 7, 3


class LlavaVision(nn.Module):
    """Vision tower + projector of a LLaVA model, with the per-token activity signal."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        core = getattr(self.tower, "vision_model", self.tower)  # transformers 5 flattens CLIP
        self.encoder_layers = core.encoder.layers
        self.num_heads = config.vision_config.num_attention_heads
        num_layers = len(self.encoder_layers)
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        # hidden_states[k] is the output of encoder layer k-1 (hidden_states[0]: embeddings).
        self.last_used = max(k if k >= 0 else num_layers + 1 + k for k in layers)
        self.has_cls = hasattr(core.embeddings, "class_embedding") and self.last_used > 0

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        pool = [hidden[k] for k in layers]
        if self.strategy == "default":
            pool = [h[:, 1:] for h in pool]
        features = self.projector(torch.cat(pool, dim=-1) if len(pool) > 1 else pool[0])
        if not self.has_cls:
            return features, features.norm(dim=-1)
        activity = self._cls_attention(hidden[self.last_used - 1])
        if self.strategy == "default":
            activity = activity[:, 1:]
        return features, activity

    def _cls_attention(self, layer_input: torch.Tensor) -> torch.Tensor:
        """Attention the CLS query pays to every token [B, T] in layer ``last_used - 1``."""
        layer = self.encoder_layers[self.last_used - 1]
        attention = layer.self_attn
        x = layer.layer_norm1(layer_input)
        batch, tokens, width = x.shape
        heads = self.num_heads
        q = attention.q_proj(x[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)
        k = attention.k_proj(x).view(batch, tokens, heads, -1).transpose(1, 2)
        scale = (width // heads) ** -0.5
        weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, T]
        return weights.mean(dim=1)[:, 0]


class LlavaDecoder(nn.Module):
    """The language model + LM head with explicit, flat KV cache inputs and outputs."""

    def __init__(self, model):
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.text_config)
        query = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        # Query j sits at cache position total - query + j; it sees keys up to there.
        key_pos = torch.arange(total, device=inputs_embeds.device)
        query_pos = torch.arange(query, device=inputs_embeds.device) + (total - query)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                  cache=cache, use_cache=True, return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        presents = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


class LlavaExport:
    """The ``ExportHalf`` of a loaded LLaVA draft."""

    def __init__(self, model, processor):
        config = model.config
        text, vision = config.text_config, config.vision_config
        if text.model_type not in SUPPORTED_TEXT:
            raise UnsupportedModelError(f"LLaVA language model {text.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_TEXT)}.")
        if vision.model_type not in SUPPORTED_VISION:
            raise UnsupportedModelError(f"LLaVA vision tower {vision.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_VISION)}.")
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)
        self.vision = LlavaVision(model).eval()
        self.decoder = LlavaDecoder(model).eval()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.decoder_spec = DecoderSpec(
            num_layers=text.num_hidden_layers, num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=head_dim, hidden_size=text.hidden_size, vocab_size=model.get_input_embeddings().weight.shape[0])
        crop = processor.image_processor.crop_size
        self.input_size = (crop["width"], crop["height"]) if crop else (224, 224)

    def vision_graph(self) -> GraphTrace:
        vision = self.model.config.vision_config
        pixel_values = torch.randn(TRACE_BATCH, vision.num_channels, vision.image_size, vision.image_size)
        axes = {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}, "activity": {0: "batch"}}
        return GraphTrace(self.vision, (pixel_values,), ["pixel_values"], ["image_features", "activity"], axes,
                          ({0: Dim("batch", min=1, max=1024)},))

    def decoder_graph(self) -> GraphTrace:
        spec = self.decoder_spec
        batch, query, past = TRACE_BATCH, TRACE_QUERY, TRACE_PAST
        embeds = torch.randn(batch, query, spec.hidden_size)
        mask = torch.ones(batch, past + query, dtype=torch.int64)
        positions = torch.arange(past, past + query, dtype=torch.int64).expand(batch, -1).contiguous()
        caches = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim) for _ in range(2 * spec.num_layers)]
        pasts, presents = past_names(spec.num_layers), present_names(spec.num_layers)
        axes = {"inputs_embeds": {0: "batch", 1: "query"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "query"}, "logits": {0: "batch", 1: "query"},
                **{name: {0: "batch", 2: "past"} for name in pasts},
                **{name: {0: "batch", 2: "total"} for name in presents}}
        b, s, p = Dim("batch", min=1, max=1024), Dim("query", min=1, max=65536), Dim("past", min=0, max=65536)
        # ``*past`` binds as one argument, so its shapes are one nested tuple; the mask's
        # length (past + query) is left for the exporter to derive.
        dims = ({0: b, 1: s}, {0: b, 1: Dim.AUTO}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in caches))
        return GraphTrace(self.decoder, (embeds, mask, positions, *caches),
                          ["inputs_embeds", "attention_mask", "position_ids", *pasts], ["logits", *presents],
                          axes, dims)

    def embed_tokens(self) -> np.ndarray:
        return self.model.get_input_embeddings().weight.detach().float().numpy().astype(np.float32)

    def processor_inputs(self, image, question: str) -> dict:
        return dict(self.processor(images=image, text=self.template.replace("{question}", question),
                                   return_tensors="pt"))

    def vision_feeds(self, inputs) -> dict[str, np.ndarray]:
        return {"pixel_values": inputs["pixel_values"].numpy().astype(np.float32)}

    def image_section(self) -> dict:
        ip = self.processor.image_processor
        image_size = self.model.config.vision_config.image_size
        size = ip.size
        shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        resample = getattr(ip, "resample", 3)
        return {
            "size": [image_size, image_size],
            "resize_shortest_edge": shortest if shortest is not None else image_size,
            "crop_size": _size(getattr(ip, "crop_size", None), (image_size, image_size)),
            "do_center_crop": bool(getattr(ip, "do_center_crop", False)),
            "rescale_factor": float(getattr(ip, "rescale_factor", 1 / 255)),
            "mean": [float(x) for x in ip.image_mean],
            "std": [float(x) for x in ip.image_std],
            "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
            "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
        }

    def tokenizer_section(self, tokenizer_file: Path) -> dict:
        from tokenizers import Tokenizer

        from covspec.protocol.vocab import vocab_hash

        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
        return {"file": tokenizer_file.name, "vocab_size": len(vocab), "vocab_hash": vocab_hash(vocab),
                "bos_id": tok.bos_token_id, "eos_ids": [int(i) for i in eos_ids], "pad_id": tok.pad_token_id,
                "image_token_id": int(self.model.config.image_token_id)}

    def source_section(self) -> dict:
        config = self.model.config
        return {"architecture": type(self.model).__name__, "text_model_type": config.text_config.model_type,
                "vision_model_type": config.vision_config.model_type}


def _size(value, default) -> list[int]:
    if value is None:
        return list(default)
    get = value.get if isinstance(value, dict) else lambda key: getattr(value, key, None)
    return [get("height"), get("width")] if get("height") is not None else list(default)
