"""Llama-style decoder layers traced as few ONNX nodes (a shared-buffer decoder's export).

Traced as written, a transformers attention layer becomes some 50 small nodes per
layer (shape arithmetic for every ``view``, ``transpose``, the rotary halves) around
its matrix products; at 0.1-0.5B parameters onnxruntime spends about a third of a
decode step on them. While ``FusedLayers.active``, each attention layer of a class in
``FUSABLE_ATTENTION`` (their forward is exactly: q/k/v projections, rotary position
embedding, attention, output projection) runs instead as

    q, k, v = one projection of the hidden states, split     [B, S, (H + 2 KVH) * HD]
    q, k = rotary_embedding(q | k, position_ids, cos, sin)   com.microsoft.RotaryEmbedding
    out = group_query_attention(q, k, v, past)                com.microsoft.GroupQueryAttention
    o_proj(out)

and each MLP of a class in ``FUSABLE_MLP`` (``down(act(gate(x)) * up(x))``) with one
gate+up projection, split. The cos/sin rows are the model's own rotary module's output
at the step's positions (``rotary_rows``: so every position-only rope type, its scaling
and attention factor, is what the model computes, at any position), computed once per
forward. Positions may skip values (pruned visual tokens keep theirs). Layers of any other
class, a rope that depends on the sequence length (``dynamic``), partial rotary, or
a model whose attention class is not listed (M-RoPE's, Gemma's with its norms) keep
the traced path: ``fusable`` says which.

``rotary_embedding`` is a torch op (``covspec::rotary_embedding``) with an eager
reference equal to transformers' ``apply_rotary_pos_emb``, a torchscript symbolic and
a dynamo translation. The projections' weights are concatenated once, beside the
model; the model's own forwards are swapped only while ``active``.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch import nn

FUSABLE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
FUSABLE_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
ROTARY_OP = "covspec::rotary_embedding"


def _rope_type(text_config) -> str:
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"


def fusable(language_model) -> bool:
    """Whether every attention layer of ``language_model`` can run fused."""
    config = language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if _rope_type(config) == "dynamic" or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return False
    if getattr(language_model, "rotary_emb", None) is None:
        return False
    attention = [m for m in language_model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")]
    return bool(attention) and all(type(m).__name__ in FUSABLE_ATTENTION and m.head_dim == head_dim
                                   for m in attention)


def rotary_rows(language_model, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The model's own rotary (cos, sin) at ``position_ids`` [B, S] (any position, whatever its
    rope type computes), as the op takes them: caches [B*S, HD/2] and the row of each query
    in them [B, S]. Computed once per forward, shared by every layer."""
    cos, sin = language_model.rotary_emb(hidden, position_ids)                 # [B, S, HD]
    half = cos.shape[-1] // 2
    rows = torch.arange(position_ids.numel(), device=position_ids.device).reshape(position_ids.shape)
    return rows, (cos[..., :half].reshape(-1, half), sin[..., :half].reshape(-1, half))


class FusedLayers(nn.Module):
    """The fused forwards of a language model's fusable layers. The stacked projection
    weights are buffers of this module (in its state dict: initializers of the exported graph, so the
    quantizer sees them as weights), built once."""

    def __init__(self, language_model):
        super().__init__()
        _register()
        self.layers = []                     # (module, forward, buffer prefix); a plain list: no submodules
        for module in language_model.modules():
            kind = type(module).__name__
            if kind in FUSABLE_ATTENTION:
                linears, forward = (module.q_proj, module.k_proj, module.v_proj), _attention
            elif kind in FUSABLE_MLP:
                linears, forward = (module.gate_proj, module.up_proj), _mlp
            else:
                continue
            weight, bias = _stacked(*linears)
            prefix = f"stack{len(self.layers)}"
            self.register_buffer(f"{prefix}_weight", weight)
            self.register_buffer(f"{prefix}_bias", bias)
            self.layers.append((module, forward, prefix))

    @contextlib.contextmanager
    def active(self, attend):
        """While inside, the attention layers project once, rotate with the op (the cos/sin
        caches and positions from the ``covspec_kv`` step) and call ``attend(module, q, k,
        v, **kwargs) -> out [B, S, H*HD]``; the MLPs project gate and up once. Every
        forward is restored after."""
        try:
            for module, forward, prefix in self.layers:
                extra = {"attend": attend} if forward is _attention else {}
                module.forward = types.MethodType(functools.partial(
                    forward, weight=getattr(self, f"{prefix}_weight"), bias=getattr(self, f"{prefix}_bias"), **extra),
                    module)
            yield
        finally:
            for module, _, _ in self.layers:
                module.__dict__.pop("forward", None)


def _stacked(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([linear.weight for linear in linears]).detach()
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else weight.new_zeros(l.out_features)
                              for b, l in zip(biases, linears)]).detach()


def _attention(module, hidden_states, *args, weight=None, bias=None, attend=None, position_ids=None, **kwargs):
    config = module.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = module.head_dim
    query, key, value = nn.functional.linear(hidden_states, weight, bias).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    step = kwargs["covspec_kv"]
    positions, (cos, sin) = step.position_ids, step.rotary
    query = torch.ops.covspec.rotary_embedding(query, positions, cos, sin, heads)
    key = torch.ops.covspec.rotary_embedding(key, positions, cos, sin, kv_heads)
    return module.o_proj(attend(module, query, key, value, **kwargs)), None


def _mlp(module, x, weight=None, bias=None):
    gate, up = nn.functional.linear(x, weight, bias).split(module.gate_proj.out_features, dim=-1)
    return module.down_proj(module.act_fn(gate) * up)


def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """The eager reference: x [B, S, N*HD], position_ids [B, S], cos/sin [M, HD/2] -> x
    rotated as ``apply_rotary_pos_emb`` (halves, not interleaved)."""
    batch, length, width = x.shape
    heads = x.reshape(batch, length, num_heads, width // num_heads)
    first, second = heads.chunk(2, dim=-1)
    c, s = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]     # [B, S, 1, HD/2]
    rotated = torch.cat([first * c - second * s, second * c + first * s], dim=-1)
    return rotated.reshape(batch, length, width)


@functools.cache
def _register() -> None:
    """Register the rotary torch op and its torchscript symbolic (once)."""
    from torch.onnx import register_custom_op_symbolic

    @torch.library.custom_op(ROTARY_OP, mutates_args=())
    def _op(x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            num_heads: int) -> torch.Tensor:
        return rotary_embedding(x, position_ids, cos, sin, num_heads)

    @_op.register_fake
    def _(x, position_ids, cos, sin, num_heads):
        return x.new_empty(x.shape)

    register_custom_op_symbolic(ROTARY_OP, _symbolic, 1)


def _symbolic(g, x, position_ids, cos, sin, num_heads):
    """torchscript: ``com.microsoft.RotaryEmbedding`` (inputs x, position_ids, cos, sin)."""
    from torch.onnx import symbolic_helper as helper

    out = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos, sin, interleaved_i=0,
               num_heads_i=helper._get_const(num_heads, "i", "num_heads"))
    out.setType(x.type())
    return out


def dynamo_translations() -> dict:
    """The dynamo exporter's ``custom_translation_table`` entry for the rotary op."""
    import onnxscript
    from onnx.defs import OpSchema

    _register()
    single = OpSchema.FormalParameterOption.Single
    inputs = [OpSchema.FormalParameter(name, kind, "", param_option=single)
              for name, kind in (("input", "T"), ("position_ids", "M"), ("cos_cache", "T"), ("sin_cache", "T"))]
    schema = OpSchema("RotaryEmbedding", "com.microsoft", 1, inputs=inputs,
                      outputs=[OpSchema.FormalParameter("output", "T", "")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int64)"], "")],
                      attributes=[OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, ""),
                                  OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "")])
    rotary = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "RotaryEmbedding", schema)

    def translate(x, position_ids, cos, sin, num_heads: int):
        return rotary(x, position_ids, cos, sin, interleaved=0, num_heads=num_heads)

    return {torch.ops.covspec.rotary_embedding.default: translate}
