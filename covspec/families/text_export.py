"""The draft's language model as an ONNX decoder: shared by every family whose language
model is a transformers decoder (Llama, Mistral, Qwen2, SmolLM, ...).

- ``FlatCacheDecoder``: ``inputs_embeds [B,S,D], attention_mask [B,T], position_ids
  [B,S], past_key_values.{i}.key/value [B,KVH,P,HD] (, num_logits) -> logits [B,R,V],
  present.{i}.key/value``; ``position_ids`` is [A,B,S] for a model with A position axes
  (Qwen2-VL's 3-D M-RoPE: ``decoder_graph(..., position_axes=3)``). Queries sit at cache
  positions T-S..T-1, so ``position_ids`` may skip values (pruned visual tokens keep their
  original positions). Two cache layouts (``KV_CACHE_LAYOUTS``):

  * ``"shared-buffer"`` (the default): each layer's attention is onnxruntime's
    ``com.microsoft.GroupQueryAttention`` (``seqlens_k`` = mask sum - 1, so the mask is a
    right-padded one). Run with a past of exactly P = T-S rows it returns presents of
    P+S rows, as ``"concat"`` does; bound (IO binding) to one preallocated buffer of
    capacity C >= T as both past and present, it writes the S new rows at P..T-1 in
    place and reads only rows < T, so a step copies nothing and rollback is a shorter
    mask (onnxruntime-genai's ``past_present_share_buffer``). ``num_logits`` (an
    optional input: an int64 scalar initializer, 0 = every row) asks for the logits of
    the last rows only (prefill needs one row, not ``S x V``).
  * ``"concat"``: the model's own attention over a concatenated cache (P+S rows out)
    with an explicit additive mask; logits for every row. Kept as the reference the
    shared buffer is tested against.

  Sliding-window attention is applied as the model's own masks do it (``sliding_layout``:
  every layer for Mistral's ``sliding_window``, the ``sliding_attention`` layers of
  ``layer_types`` for Qwen2 with ``use_sliding_window``; ``local_window_size`` = window
  in the shared layout); the cache keeps every token, so rollback works at any length.
  A shared-buffer decoder of a Llama, Mistral or Qwen2 language model runs its layers
  fused (``fused_layers``: one q/k/v and one gate/up projection, onnxruntime's
  ``RotaryEmbedding``; at SmolLM2-135M size an int4 decode step went from 13.2 to 9.0 ms
  and an int8 one from 15.6 to 12.2 ms, one thread, context 256), unless ``fuse=False``.
- ``decoder_spec``, ``decoder_graph``: its cache layout and how to trace it (batch >= 2,
  past 7, query 3, so no size collapses to a constant).
- ``tokenizer_section``: the manifest's tokenizer section (ids, EOS as ``generate``
  uses them, vocabulary hash).

Torch and transformers; imported by export halves only. The attention function and the
``covspec::group_query_attention`` torch op (eager reference, torchscript symbolic,
dynamo translation) are registered on first use, never at import.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from covspec.families.fused_layers import FusedLayers, fusable, rotary_rows
from covspec.families.fused_layers import dynamo_translations as fused_translations
from covspec.families.interface import DecoderSpec, GraphTrace, past_names, present_names

TRACE_BATCH, TRACE_PAST, TRACE_QUERY = 2, 7, 3
KV_CACHE_LAYOUTS = ("shared-buffer", "concat")
NUM_LOGITS = "num_logits"          # the optional input of a shared-buffer decoder
ATTENTION = "covspec_gqa"          # the transformers attention implementation it registers
OP_NAME = "covspec::group_query_attention"


def sliding_layout(text_config) -> tuple[int | None, bool]:
    """(window, every layer slides) of a language model config; (None, False) without one."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None, False
    return int(window), layer_types is None or "full_attention" not in layer_types


@dataclass
class _SharedStep:
    """What every layer's attention needs in one forward of a shared-buffer decoder."""

    past: tuple                         # past key, value per layer: [B, KVH, P, HD]
    seqlens_k: torch.Tensor             # [B] int32: total length - 1
    total: torch.Tensor                 # [] int32: the mask's width
    query_lens: torch.Tensor            # [B] int32: S
    windows: list[int]                  # per layer: local_window_size (-1: full attention)
    position_ids: torch.Tensor | None = None      # fused layers: each query's row in ``rotary`` [B, S]
    rotary: tuple | None = None                   # fused layers: (cos, sin) [B*S, HD/2]
    presents: dict = field(default_factory=dict)


class FlatCacheDecoder(nn.Module):
    """A language model + LM head with explicit, flat KV cache inputs and outputs."""

    def __init__(self, language_model, lm_head, text_config, kv_cache: str = "shared-buffer", fuse: bool = True):
        super().__init__()
        if kv_cache not in KV_CACHE_LAYOUTS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_LAYOUTS}, not {kv_cache!r}")
        self.language_model = language_model
        self.lm_head = lm_head
        self.kv_cache = kv_cache
        self.num_layers = int(text_config.num_hidden_layers)
        self.window, self.all_sliding = sliding_layout(text_config)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * self.num_layers
        self.layer_windows = [self.window if self.window is not None and (self.all_sliding or kind == "sliding_attention")
                              else -1 for kind in layer_types]
        fused = fuse and kv_cache == "shared-buffer" and fusable(language_model)
        self.fused = FusedLayers(language_model) if fused else None

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        """``rest``: the past (key, value per layer), then optionally ``num_logits`` (shared layout)."""
        past, extra = rest[:2 * self.num_layers], rest[2 * self.num_layers:]
        if self.kv_cache == "concat":
            return self._concat_forward(inputs_embeds, attention_mask, position_ids, past)
        hidden, presents = self._shared_forward(inputs_embeds, attention_mask, position_ids, past)
        if extra:                                                # the last num_logits rows (0: all)
            count = torch.ones_like(hidden[0, :, 0], dtype=torch.int64).sum()       # S, traced as a value
            keep = torch.where(extra[0] > 0, torch.minimum(extra[0], count), count)
            hidden = hidden.index_select(1, torch.arange(count - keep, count, device=hidden.device))
        return (self.lm_head(hidden), *presents)

    def _shared_forward(self, inputs_embeds, attention_mask, position_ids, past):
        step = _SharedStep(past=past, seqlens_k=attention_mask.sum(1).to(torch.int32) - 1,
                           total=torch.ones_like(attention_mask[0]).sum().to(torch.int32),
                           query_lens=torch.ones_like(inputs_embeds[:, :, 0], dtype=torch.int64).sum(1).to(torch.int32),
                           windows=self.layer_windows)
        if self.fused is not None:
            step.position_ids, step.rotary = rotary_rows(self.language_model, inputs_embeds, position_ids)
        config = self.language_model.config
        unused = inputs_embeds.new_zeros(1, 1, 1, 1)            # the attention reads no mask
        fused = self.fused.active(_fused_attention) if self.fused is not None else contextlib.nullcontext()
        with _attention_implementation(config, ATTENTION), fused:
            out = self.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                      attention_mask={"full_attention": unused, "sliding_attention": unused},
                                      use_cache=False, return_dict=True, covspec_kv=step)
        if len(step.presents) != self.num_layers:
            raise RuntimeError(f"only {len(step.presents)} of {self.num_layers} layers used the shared KV attention.")
        presents = []
        for layer in range(self.num_layers):
            presents += list(step.presents[layer])
        return out.last_hidden_state, presents

    def _concat_forward(self, inputs_embeds, attention_mask, position_ids, past):
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


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """``config``'s attention implementation is ``name`` while inside (the model's own
    attention stays in place for everything else, e.g. the parity reference)."""
    _register()
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = saved


def _shared_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                      covspec_kv: _SharedStep | None = None, **kwargs):
    """The transformers attention function of a shared-buffer decoder: query [B,H,S,HD],
    key/value [B,KVH,S,HD] (position-encoded, new tokens only) -> ([B,S,H,HD], None)."""
    batch, heads, length, head_dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch, length, -1) for t in (query, key, value)]     # [B, S, N*HD]
    out = _attend(module, *flat, heads, key.shape[1], scaling if scaling is not None else head_dim ** -0.5,
                  softcap, covspec_kv)
    return out.reshape(batch, length, heads, head_dim), None


def _fused_attention(module, query, key, value, covspec_kv: _SharedStep | None = None, **kwargs):
    """A fused layer's attention (``fused_layers``): query [B,S,H*HD], key/value [B,S,KVH*HD]
    (position-encoded, new tokens only) -> [B,S,H*HD]."""
    config = module.config
    return _attend(module, query, key, value, config.num_attention_heads,
                   config.num_key_value_heads or config.num_attention_heads, module.scaling, None, covspec_kv)


def _attend(module, query, key, value, heads: int, kv_heads: int, scaling: float, softcap, step: _SharedStep | None):
    """The op over layer ``module.layer_idx``'s past; records its presents in ``step``."""
    if step is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only inside FlatCacheDecoder.")
    layer = module.layer_idx
    out, present_key, present_value = torch.ops.covspec.group_query_attention(
        query, key, value, step.past[2 * layer], step.past[2 * layer + 1], step.seqlens_k, step.total,
        step.query_lens, heads, kv_heads, float(scaling), step.windows[layer], float(softcap or 0.0))
    step.presents[layer] = (present_key, present_value)
    return out


def group_query_attention(query, key, value, past_key, past_value, num_heads: int, scale: float,
                          local_window_size: int = -1, softcap: float = 0.0):
    """The eager reference of the op (a past of exactly P rows): query [B,S,H*HD], key/value
    [B,S,KVH*HD], past [B,KVH,P,HD] -> (output [B,S,H*HD], present key, value [B,KVH,P+S,HD])."""
    batch, length, _ = query.shape
    kv_heads, past_len, head_dim = past_key.shape[1], past_key.shape[2], past_key.shape[3]
    new_key, new_value = (t.reshape(batch, length, kv_heads, head_dim).transpose(1, 2) for t in (key, value))
    present_key, present_value = torch.cat([past_key, new_key], 2), torch.cat([past_value, new_value], 2)
    group = num_heads // kv_heads
    q = query.reshape(batch, length, num_heads, head_dim).transpose(1, 2)                      # [B, H, S, HD]
    k, v = present_key.repeat_interleave(group, 1), present_value.repeat_interleave(group, 1)  # [B, H, T, HD]
    scores = (q @ k.transpose(-1, -2)) * scale                                                  # [B, H, S, T]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    key_pos = torch.arange(past_len + length, device=query.device)
    query_pos = torch.arange(length, device=query.device) + past_len
    allowed = key_pos[None, :] <= query_pos[:, None]
    if local_window_size > 0:
        allowed &= key_pos[None, :] > query_pos[:, None] - local_window_size
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v                                                        # [B, H, S, HD]
    return out.transpose(1, 2).reshape(batch, length, num_heads * head_dim), present_key, present_value


@functools.cache
def _register() -> None:
    """Register the attention function, the torch op and its torchscript symbolic (once)."""
    from torch.onnx import register_custom_op_symbolic
    from transformers import AttentionInterface

    @torch.library.custom_op(OP_NAME, mutates_args=())
    def _op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
            past_value: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor, query_lens: torch.Tensor,
            num_heads: int, kv_num_heads: int, scale: float, local_window_size: int,
            softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return group_query_attention(query, key, value, past_key, past_value, num_heads, scale, local_window_size,
                                     softcap)

    @_op.register_fake
    def _(query, key, value, past_key, past_value, seqlens_k, total, query_lens, num_heads, kv_num_heads, scale,
          local_window_size, softcap):
        rows = past_key.shape[2] + query.shape[1]
        shape = (past_key.shape[0], past_key.shape[1], rows, past_key.shape[3])
        return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)

    register_custom_op_symbolic(OP_NAME, _symbolic, 1)
    AttentionInterface.register(ATTENTION, _shared_attention)


def _symbolic(g, query, key, value, past_key, past_value, seqlens_k, total, query_lens, num_heads, kv_num_heads,
              scale, local_window_size, softcap):
    """torchscript: the op as ``com.microsoft.GroupQueryAttention`` (query_seqlens is input 16)."""
    from torch.onnx import symbolic_helper as helper

    ints = {name: helper._get_const(value, "i", name) for name, value in
            (("num_heads", num_heads), ("kv_num_heads", kv_num_heads), ("local_window_size", local_window_size))}
    floats = {name: helper._get_const(value, "f", name) for name, value in (("scale", scale), ("softcap", softcap))}
    none = helper._optional_input_placeholder_tensor(g)
    inputs = [query, key, value, past_key, past_value, seqlens_k, total] + [none] * 9 + [query_lens]
    out = g.op("com.microsoft::GroupQueryAttention", *inputs, outputs=3,
               num_heads_i=ints["num_heads"], kv_num_heads_i=ints["kv_num_heads"],
               local_window_size_i=ints["local_window_size"], scale_f=floats["scale"], softcap_f=floats["softcap"])
    for value, like in zip(out, (query, past_key, past_value)):
        value.setType(like.type())
    return out


def dynamo_translations() -> dict:
    """The dynamo exporter's ``custom_translation_table`` entries for the ops (this one's and
    the fused layers' rotary op)."""
    import onnxscript

    _register()

    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())

    def translate(query, key, value, past_key, past_value, seqlens_k, total, query_lens, num_heads: int,
                  kv_num_heads: int, scale: float, local_window_size: int, softcap: float):
        return gqa(
            query, key, value, past_key, past_value, seqlens_k, total, *([None] * 9), query_lens, num_heads=num_heads,
            kv_num_heads=kv_num_heads, scale=scale, local_window_size=local_window_size, softcap=softcap,
            _outputs=3)

    return {torch.ops.covspec.group_query_attention.default: translate, **fused_translations()}


def _gqa_schema():
    """The part of onnxruntime's GroupQueryAttention schema the op uses (onnx ships none
    for com.microsoft ops; onnxscript needs one to emit the node)."""
    from onnx.defs import OpSchema

    optional, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
             "k_norm_weight", "query_seqlens"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "query_seqlens": "M", "position_ids": "I"}
    inputs = [OpSchema.FormalParameter(name, types.get(name, "T"), "",
                                       param_option=single if name in ("query", "seqlens_k", "total_sequence_length")
                                       else optional) for name in names]
    outputs = [OpSchema.FormalParameter(name, "T", "") for name in ("output", "present_key", "present_value")]
    constraints = [("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                   ("I", ["tensor(int64)"], "")]
    attributes = [OpSchema.Attribute(name, kind, "") for name, kind in (
        ("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
        ("local_window_size", OpSchema.AttrType.INT), ("scale", OpSchema.AttrType.FLOAT),
        ("softcap", OpSchema.AttrType.FLOAT))]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=constraints, attributes=attributes)


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


def decoder_graph(decoder: nn.Module, spec: DecoderSpec, position_axes: int = 0) -> GraphTrace:
    """How to trace ``decoder``: example inputs, names and dynamic axes. ``position_axes``:
    0 for ``position_ids [B, S]``, A for ``[A, B, S]`` (3 for M-RoPE). A shared-buffer
    ``FlatCacheDecoder`` also takes ``num_logits`` (traced as 2 rows of 3), after the past;
    the exporter turns it into an optional input (``graphs.export_graph``)."""
    batch, query, past = TRACE_BATCH, TRACE_QUERY, TRACE_PAST
    embeds = torch.randn(batch, query, spec.hidden_size)
    mask = torch.ones(batch, past + query, dtype=torch.int64)
    positions = torch.arange(past, past + query, dtype=torch.int64).expand(batch, -1).contiguous()
    lead = 1 if position_axes else 0   # the batch axis of position_ids
    if position_axes:
        positions = positions.expand(position_axes, -1, -1).contiguous()
    caches = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim) for _ in range(2 * spec.num_layers)]
    pasts, presents = past_names(spec.num_layers), present_names(spec.num_layers)
    shared = getattr(decoder, "kv_cache", "concat") == "shared-buffer"
    axes = {"inputs_embeds": {0: "batch", 1: "query"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {lead: "batch", lead + 1: "query"}, "logits": {0: "batch", 1: "rows" if shared else "query"},
            **{name: {0: "batch", 2: "past"} for name in pasts},
            **{name: {0: "batch", 2: "present" if shared else "total"} for name in presents}}
    b, s, p = Dim("batch", min=1, max=1024), Dim("query", min=1, max=65536), Dim("past", min=0, max=65536)
    # ``*past`` binds as one argument, so its shapes are one nested tuple; the mask's
    # length (past + query) is left for the exporter to derive.
    cache_dims = tuple({0: b, 2: p} for _ in caches)
    args, names = (embeds, mask, positions, *caches), ["inputs_embeds", "attention_mask", "position_ids", *pasts]
    if shared:
        args, names = (*args, torch.tensor(2, dtype=torch.int64)), [*names, NUM_LOGITS]
        cache_dims = (*cache_dims, None)
    dims = ({0: b, 1: s}, {0: b, 1: Dim.AUTO}, {lead: b, lead + 1: s}, cache_dims)
    return GraphTrace(decoder, args, names, ["logits", *presents], axes, dims)


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
