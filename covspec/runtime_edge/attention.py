"""A batched forward that reads every session's KV where it lives: no per-step copies of the past.

``in_place(model, sessions, new)`` is the context of one target forward over B sessions
(``SessionKV``) with ragged pasts, row b bringing ``new[b]`` real input tokens (rows are
right-padded to the longest). It yields the transformers ``Cache`` to pass to the model
and, for the forward's duration, switches the model's text attention to ``ATTENTION``:

- the cache's layer l (``_InPlaceLayer``) writes row b's first ``new[b]`` key and value
  states into session b's own buffers right after its past (each session must have room:
  ``SessionKV.reserve``) and hands the states back unchanged: per step, only the new
  tokens move;
- ``attention`` then runs, per row, PyTorch's scaled-dot-product attention of the row's
  real queries over views of its session's buffers (past and new, in place), causal
  within the new tokens, with the layer's sliding window (``sliding_window``, as the
  transformers masks apply it: a key is seen while ``key > query - window``) and grouped
  heads without repeating them (``enable_gqa``). Padded query rows give zeros.

So each session's attention is exactly what a forward of its own computes, whichever
sessions share the forward; no padding of pasts, no mask over the batch, no ``repeat_kv``
copy. Any attention call that is not this forward's (a vision tower, a prefill) goes to
transformers' SDPA unchanged. On leaving, each session's ``length`` is unchanged: the
caller advances it by what it keeps. Positions are the caller's (explicit
``position_ids``); the model sees an empty past (``get_seq_length`` 0), so the masks it
builds stay [Q, Q] and are not used here. One thread only (the edge's model thread).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from covspec.runtime_edge.kv import SessionKV

ATTENTION = "covspec_in_place"


class _Forward:
    """The sessions of the forward under way, and the key states each layer handed on."""

    def __init__(self, sessions: Sequence[SessionKV], new: Sequence[int]):
        self.sessions, self.new = list(sessions), list(new)
        self.handed: dict[int, torch.Tensor] = {}
        self.masks: dict[tuple[int, int | None], torch.Tensor | None] = {}   # by (row, window): every layer's

    def mask(self, row: int, sliding_window: int | None, device) -> torch.Tensor | None:
        """Row ``row``'s attention mask [n, K] (None: every key seen), made once per forward:
        causal within the new tokens, with the layer's sliding window."""
        key = (row, sliding_window)
        if key not in self.masks:
            past, count = self.sessions[row].length, self.new[row]
            mask = None
            if count > 1 or (sliding_window is not None and past + 1 > sliding_window):
                at = torch.arange(past, past + count, device=device)[:, None]               # [n, 1] query positions
                seen = torch.arange(past + count, device=device)[None, :]                   # [1, K]
                mask = seen <= at
                if sliding_window is not None:
                    mask &= seen > at - sliding_window
            self.masks[key] = mask
        return self.masks[key]


_current: _Forward | None = None


class _InPlaceLayer(DynamicLayer):
    """Layer ``index`` of an in-place forward's cache (the module's contract)."""

    def __init__(self, forward: _Forward, index: int, device):
        super().__init__()
        self.forward, self.index = forward, index
        self.is_initialized = True
        self.device = device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        for row, (session, count) in enumerate(zip(self.forward.sessions, self.forward.new)):
            end = session.length + count
            session.keys[self.index][:, session.length:end] = key_states[row, :, :count]
            session.values[self.index][:, session.length:end] = value_states[row, :, :count]
        self.forward.handed[self.index] = key_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return query_length, 0


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *,
              scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """``ATTENTION``: per session, in place, for this forward's layers; SDPA for anything else."""
    forward, layer = _current, getattr(module, "layer_idx", None)
    if forward is None or forward.handed.get(layer) is not key:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("in-place attention supports neither logit softcapping nor attention sinks")
    out = query.new_zeros((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))   # [B, Q, H, D]
    for row, (session, count) in enumerate(zip(forward.sessions, forward.new)):
        past = session.length
        keys = session.keys[layer][None, :, :past + count]                                   # [1, Hkv, K, D]
        values = session.values[layer][None, :, :past + count]
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[row:row + 1, :, :count], keys, values, attn_mask=forward.mask(row, sliding_window, query.device),
            scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])                       # [1, H, n, D]
        out[row, :count] = attended[0].transpose(0, 1)
    return out, None


@functools.cache
def _register() -> None:
    """Make ``ATTENTION`` known to transformers (once; imported late: transformers' attention
    and mask modules import Triton, which must not load before a test can set its interpreter)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def in_place(model, sessions: Sequence[SessionKV], new: Sequence[int]) -> Iterator[Cache]:
    """The cache of one in-place forward of ``model`` (the module's contract)."""
    global _current
    _register()
    forward = _Forward(sessions, new)
    device = sessions[0].keys[0].device
    cache = Cache(layers=[_InPlaceLayer(forward, index, device) for index in range(len(sessions[0].keys))])
    config = model.config.get_text_config()
    saved, config._attn_implementation_internal = config._attn_implementation_internal, ATTENTION
    _current = forward
    try:
        yield cache
    finally:
        _current = None
        config._attn_implementation_internal = saved
