"""Per-architecture wrappers that give each exported graph a flat tensor signature.

``adapter_for(model)`` returns the adapter of a loaded model; supported:
``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower and a Llama,
Mistral or Qwen2 language model. An adapter exposes

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
- ``embed_tokens``: the LM's input embedding table ``[V, D]``.
- ``decoder_spec``: layer count, KV heads, head size, hidden size, vocabulary rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covspec.export.errors import UnsupportedModelError

SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "past_input_names": past_names(self.num_layers),
                "present_output_names": present_names(self.num_layers)}


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


class LlavaAdapter:
    """Export adapter for ``LlavaForConditionalGeneration``."""

    architecture = "LlavaForConditionalGeneration"

    def __init__(self, model):
        config = model.config
        text, vision = config.text_config, config.vision_config
        if text.model_type not in SUPPORTED_TEXT:
            raise UnsupportedModelError(f"LLaVA language model {text.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_TEXT)}.")
        if vision.model_type not in SUPPORTED_VISION:
            raise UnsupportedModelError(f"LLaVA vision tower {vision.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_VISION)}.")
        self.model = model
        self.text_model_type = text.model_type
        self.vision_model_type = vision.model_type
        self.vision = LlavaVision(model).eval()
        self.decoder = LlavaDecoder(model).eval()
        embed = model.get_input_embeddings().weight
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.decoder_spec = DecoderSpec(
            num_layers=text.num_hidden_layers, num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=head_dim, hidden_size=text.hidden_size, vocab_size=embed.shape[0])
        self.image_token_id = config.image_token_id

    @property
    def embed_tokens(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach().float()


ADAPTERS = {LlavaAdapter.architecture: LlavaAdapter}


def adapter_for(model) -> LlavaAdapter:
    """The export adapter for a loaded model, or ``UnsupportedModelError``."""
    architecture = type(model).__name__
    if architecture not in ADAPTERS:
        raise UnsupportedModelError(f"architecture {architecture!r} has no export adapter; supported: "
                                    f"{', '.join(ADAPTERS)}.")
    return ADAPTERS[architecture](model)
