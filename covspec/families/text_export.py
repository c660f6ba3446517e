"""The draft's language model as an ONNX decoder: shared by every family whose language
model is a transformers decoder (Llama, Mistral, Qwen2, SmolLM, ...).

- ``FlatCacheDecoder``: ``inputs_embeds [B,S,D], attention_mask [B,P+S], position_ids
  [B,S], past_key_values.{i}.key/value [B,KVH,P,HD] -> logits [B,S,V],
  present.{i}.key/value [B,KVH,P+S,HD]``; ``position_ids`` is [A,B,S] for a model with
  A position axes (Qwen2-VL's 3-D M-RoPE: ``decoder_graph(..., position_axes=3)``). The causal mask is built from cache
  positions (queries sit at P..P+S-1), so ``position_ids`` may skip values (pruned
  visual tokens keep their original positions). Sliding-window attention is applied in
  the mask, as the model's own masks do it (``sliding_layout``: every layer for Mistral's
  ``sliding_window``, the ``sliding_attention`` layers of ``layer_types`` for Qwen2 with
  ``use_sliding_window``); the cache keeps every token, so rollback works at any length.
- ``decoder_spec``, ``decoder_graph``: its cache layout and how to trace it (batch >= 2,
  past 7, query 3, so no size collapses to a constant).
- ``tokenizer_section``: the manifest's tokenizer section (ids, EOS as ``generate``
  uses them, vocabulary hash).

Torch and transformers; imported by export halves only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from covspec.families.interface import DecoderSpec, GraphTrace, past_names, present_names

TRACE_BATCH, TRACE_PAST, TRACE_QUERY = 2, 7, 3


def sliding_layout(text_config) -> tuple[int | None, bool]:
    """(window, every layer slides) of a language model config; (None, False) without one."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None, False
    return int(window), layer_types is None or "full_attention" not in layer_types


class FlatCacheDecoder(nn.Module):
    """A language model + LM head with explicit, flat KV cache inputs and outputs."""

    def __init__(self, language_model, lm_head, text_config):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.window, self.all_sliding = sliding_layout(text_config)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(ddp_cache_data=pairs)          # full layers: presents keep every token
        query = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        # Query j sits at cache position total - query + j; it sees keys up to there.
        key_pos = torch.arange(total, device=inputs_embeds.device)
        query_pos = torch.arange(query, device=inputs_embeds.device) + (total - query)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = _additive(allowed, inputs_embeds.dtype)
        if self.window is not None:                          # keys within the window, as the model's masks
            windowed = _additive(allowed & (key_pos[None, :] > query_pos[:, None] - self.window), inputs_embeds.dtype)
            mask = windowed if self.all_sliding else {"full_attention": mask, "sliding_attention": windowed}
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                  cache=cache, use_cache=True, return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        presents = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask -> an additive one (0 where allowed, the dtype's minimum elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def decoder_spec(text_config, vocab_rows: int) -> DecoderSpec:
    """The cache layout of a language model of ``text_config`` with ``vocab_rows`` logits."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return DecoderSpec(num_layers=text_config.num_hidden_layers,
                       num_kv_heads=text_config.num_key_value_heads or text_config.num_attention_heads,
                       head_dim=head_dim, hidden_size=text_config.hidden_size, vocab_size=vocab_rows)


def decoder_graph(decoder: FlatCacheDecoder, spec: DecoderSpec, position_axes: int = 0) -> GraphTrace:
    """How to trace ``decoder``: example inputs, names and dynamic axes. ``position_axes``:
    0 for ``position_ids [B, S]``, A for ``[A, B, S]`` (3 for M-RoPE)."""
    batch, query, past = TRACE_BATCH, TRACE_QUERY, TRACE_PAST
    embeds = torch.randn(batch, query, spec.hidden_size)
    mask = torch.ones(batch, past + query, dtype=torch.int64)
    positions = torch.arange(past, past + query, dtype=torch.int64).expand(batch, -1).contiguous()
    lead = 1 if position_axes else 0   # the batch axis of position_ids
    if position_axes:
        positions = positions.expand(position_axes, -1, -1).contiguous()
    caches = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim) for _ in range(2 * spec.num_layers)]
    pasts, presents = past_names(spec.num_layers), present_names(spec.num_layers)
    axes = {"inputs_embeds": {0: "batch", 1: "query"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {lead: "batch", lead + 1: "query"}, "logits": {0: "batch", 1: "query"},
            **{name: {0: "batch", 2: "past"} for name in pasts},
            **{name: {0: "batch", 2: "total"} for name in presents}}
    b, s, p = Dim("batch", min=1, max=1024), Dim("query", min=1, max=65536), Dim("past", min=0, max=65536)
    # ``*past`` binds as one argument, so its shapes are one nested tuple; the mask's
    # length (past + query) is left for the exporter to derive.
    dims = ({0: b, 1: s}, {0: b, 1: Dim.AUTO}, {lead: b, lead + 1: s}, tuple({0: b, 2: p} for _ in caches))
    return GraphTrace(decoder, (embeds, mask, positions, *caches),
                      ["inputs_embeds", "attention_mask", "position_ids", *pasts], ["logits", *presents], axes, dims)


def tokenizer_section(model, processor, tokenizer_file: Path, image_token_id: int) -> dict:
    """The manifest's tokenizer section of ``tokenizer_file`` (the draft's tokenizer.json)."""
    from tokenizers import Tokenizer

    from covspec.protocol.vocab import vocab_hash

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
    return {"file": tokenizer_file.name, "vocab_size": len(vocab), "vocab_hash": vocab_hash(vocab),
            "bos_id": tok.bos_token_id, "eos_ids": [int(i) for i in eos_ids], "pad_id": tok.pad_token_id,
            "image_token_id": int(image_token_id)}
