"""The target VLM behind the edge: context building, prefill, cached forwards, rollback.

``TargetModel`` owns a transformers model and its processor and does tensor work
only; everything architecture-specific (loading, the prompt template, the context
and the opt-in pruned inputs) is asked of the model's family (``covspec.families``).
It knows nothing about sessions, sockets, sampling or stopping: callers get float32
logits as numpy arrays and decide themselves (``session.py``). All calls must come
from one thread (the server's model thread), under ``torch.inference_mode``. Under a
deployment regime, ``pacing`` (``covspec.regime.EdgePacing``) pads each prefill and
forward to what the regime's target would take for its shape; by default nothing is padded.

KV-cache contract: ``prefill`` returns a cache (``TargetCache``: the model's KV cache
and how generated tokens are positioned) holding every input token; ``extend``
appends its tokens to the cache and returns one logits row per token (row i scores
the token after ``tokens[i]``); ``rollback(cache, length)`` crops the cache back to
its first ``length`` tokens; ``prefill_after`` starts a cache from a cached prefix of the
context (``prefix_cache.py``) and runs the rest as an extension. For a family with
``next_position`` (M-RoPE), extensions
get explicit positions from their session's own cache, never the model's shared
state (Qwen2-VL's ``rope_deltas`` belongs to whichever session prefilled last).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covspec.families import TargetContext as Context
from covspec.families import family_for_folder, family_for_model
from covspec.protocol.errors import BAD_IMAGE, EdgeError
from covspec.protocol.vocab import vocab_hash
from covspec.regime.pacing import NO_PACING
from covspec.runtime_edge.config import ConfigError
from covspec.runtime_edge.attention import in_place
from covspec.runtime_edge.kv import SessionKV
from covspec.runtime_edge.processed_images import RememberedImages


def decode_image(data: bytes, max_pixels: int, max_aspect: float):
    """An RGB PIL image from encoded bytes (PNG, JPEG, ...); EdgeError ``bad_image`` otherwise.

    The pixel count and the aspect ratio are checked from the header before any pixel
    is decoded: processors resize the shortest edge to a fixed size, so a thin strip
    (1 x 4,000,000) would grow into gigabytes on the model thread.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise EdgeError(BAD_IMAGE, f"the image is {width}x{height} pixels; this edge accepts at most "
                                       f"{max_pixels} pixels, so downscale it before sending.")
        if min(width, height) < 1 or max(width, height) / min(width, height) > max_aspect:
            raise EdgeError(BAD_IMAGE, f"the image is {width}x{height} pixels, an aspect ratio beyond this "
                                       f"edge's {max_aspect:g}:1; crop it before sending.")
        return image.convert("RGB")
    except EdgeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EdgeError(BAD_IMAGE, f"the image bytes do not decode as an image ({exc}); send PNG or JPEG bytes.") from None


@dataclass
class TargetCache:
    """One session's KV cache: ``kv`` (a ``SessionKV``) and ``offset``, None for positions
    equal to the cache index (the model's own), else the position of the token at cache
    index i is ``i + offset`` on every axis."""

    kv: SessionKV
    offset: int | None = None

    @property
    def next_position(self) -> int:
        """The position of the next token the cache takes."""
        return self.kv.length + (self.offset or 0)


class TargetModel:
    """A target VLM of any registered family on one device, in one dtype."""

    def __init__(self, model, processor, device: str):
        if getattr(processor, "image_processor", None) is not None:   # an image's follow-ups reuse its pixels
            processor = copy.copy(processor)                           # (the caller's processor stays as it was)
            processor.image_processor = RememberedImages(processor.image_processor)
        self.model = model
        self.processor = processor
        self.device = device
        self.family = family_for_model(model).target(model, processor)
        self.template = self.family.template
        self.vocab_hash = vocab_hash(self.family.vocab())
        # The logits width; may exceed the tokenizer (a padded embedding matrix).
        self.vocab_size = int(model.get_output_embeddings().out_features)
        self.eos_ids = frozenset(self.family.eos_ids())
        self.pacing = NO_PACING          # a regime's EdgePacing pads each forward to the emulated GPU's time

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> "TargetModel":
        """Load a local model folder through its family; nothing is fetched."""
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
        model, processor = family_for_folder(path).load(path, device=device, dtype=dtype)
        return cls(model, processor, device)

    def context(self, question: str, image, keep: Sequence[int] | None = None,
                template: str | None = None) -> Context:
        """Fill the chat template (``template``: a conversation's) with ``question`` and
        process it with ``image``.

        With ``keep`` (the opt-in pruned target, not exact), only those visual tokens
        enter the context, renumbered contiguously.
        """
        return self.family.context(question, image, keep, template)

    def prefill(self, context: Context, committed: Sequence[int] = ()) -> tuple[TargetCache, np.ndarray]:
        """Run image + prompt (+ ``committed`` tokens, on a reopen) -> (cache, logits [V]).

        The logits score the token after the last input; the cache holds every input.
        Committed tokens are generated text and run as a second, cached forward: an id
        that happens to be the image placeholder is never taken for an image slot.
        """
        (cache, logits), = self.prefill_heads([context], [context.length])
        if committed:
            return cache, self.extend(cache, committed)[-1]
        return cache, logits

    def prefill_heads(self, contexts: Sequence[Context], heads: Sequence[int]) -> list[tuple[TargetCache, np.ndarray]]:
        """Run the first ``heads[b]`` tokens of each context, image included, as one forward
        -> per context (cache holding them, logits [V] after the last). The contexts must
        have inputs of equal shapes after the cut (``head_shape``) and no ``keep`` unless
        alone. A head must cover every token whose KV depends on the image or on a later
        token (``shortest_reused_prefix``); the rest of the context then runs as cached
        extensions (``extend_batch``), as ``prefill_after`` runs it."""
        import torch
        from transformers import DynamicCache

        assert len(contexts) == 1 or all(c.keep is None for c in contexts), "a pruned context prefills alone"
        rows = [_head_inputs(self.family, context, head) for context, head in zip(contexts, heads)]
        inputs = {name: torch.cat([row[name] for row in rows]) if isinstance(rows[0][name], torch.Tensor)
                  else rows[0][name] for name in rows[0]}
        # Full-length layers even for sliding-window models (their own sliding cache cannot
        # be rolled back once the window is full); the masks still apply the window. A fresh
        # one for every prefill, also over a context's own (Gemma 3's), which a second prefill
        # of the same context would otherwise continue.
        inputs["cache"] = DynamicCache()
        with self.pacing.prefill(sum(heads), len(contexts)):
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return [(self.continuing(context, SessionKV.from_cache(out.cache, row)), _to_numpy(out.logits[row, -1]))
                for row, context in enumerate(contexts)]

    def head_shape(self, context: Context, head: int) -> tuple | None:
        """What decides whether contexts' heads can share a forward (``prefill_heads``): the
        shapes of their inputs after a cut at ``head`` (None: a pruned context, alone)."""
        if context.keep is not None:
            return None
        return tuple((name, tuple(getattr(value, "shape", ())))
                     for name, value in sorted(_head_inputs(self.family, context, head).items()))

    def prefill_after(self, context: Context, prefix: SessionKV, rest: Sequence[int]) -> tuple[TargetCache, np.ndarray]:
        """Continue ``prefix`` (the KV of the first ``prefix.length`` tokens of ``context``; the
        returned cache takes it over) with ``rest`` (the context's remaining ids, then a reopen's
        committed tokens; at least one) in one cached forward, as ``extend`` runs it -> (cache,
        logits [V]): what ``prefill(context, committed)`` returns, up to float rounding."""
        cache = self.continuing(context, prefix)
        return cache, self.extend(cache, rest)[-1]

    def continuing(self, context: Context, kv: SessionKV) -> TargetCache:
        """A session's cache over ``kv`` (a prefix of ``context``, taken over), positioned as
        the family says, ready for the rest of the context as cached extensions."""
        next_position = self.family.next_position(context)
        return TargetCache(kv, None if next_position is None else next_position - context.length)

    def extend(self, cache: TargetCache, tokens: Sequence[int]) -> np.ndarray:
        """One cached forward over ``tokens`` -> logits [len(tokens), V] (numpy); the cache
        grows by len(tokens)."""
        return _to_numpy(self.extend_batch([cache], [tokens]))

    def extend_batch(self, caches: Sequence[TargetCache], inputs: Sequence[Sequence[int]]):
        """One target forward over several sessions at once -> logits [sum of lengths, V],
        a tensor on the model's device: session b's rows follow session b - 1's, row i
        scores the token after ``inputs[b][i]``. Cache b grows by len(inputs[b]).

        Rows are right-padded to the longest input; every row gets its true positions and
        attends to its own session's cache in place (``attention.in_place``: only the new
        tokens are written, nothing of the past is copied), so each session's logits are
        what its own forward would give (up to float rounding).
        """
        import torch

        query_len = max(len(tokens) for tokens in inputs)
        new = [len(tokens) for tokens in inputs]
        sessions = [cache.kv for cache in caches]
        for session, count in zip(sessions, new):
            session.reserve(session.length + count)
        ids = torch.zeros((len(caches), query_len), dtype=torch.long)                  # [B, Q]
        positions = torch.zeros((len(caches), query_len), dtype=torch.long)            # [B, Q]
        for row, (cache, tokens) in enumerate(zip(caches, inputs)):
            ids[row, :len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
            start = cache.next_position
            positions[row] = torch.arange(start, start + query_len)
        with self.pacing.forward([s.length for s in sessions], new), in_place(self.model, sessions, new) as kv:
            out = self.model(input_ids=ids.to(self.device), cache=kv, use_cache=True,
                             position_ids=positions.to(self.device))
        for session, count in zip(sessions, new):
            session.length += count
        return torch.cat([out.logits[row, :count] for row, count in enumerate(new)])

    @staticmethod
    def rollback(cache: TargetCache, length: int) -> None:
        """Crop ``cache`` to its first ``length`` tokens (no-op if it holds no more)."""
        cache.kv.rollback(length)

    @staticmethod
    def bound(cache: TargetCache, positions: int) -> None:
        """The most positions ``cache`` will need: its buffers stop growing by doubling there."""
        cache.kv.limit = positions


def _head_inputs(family, context: Context, head: int) -> dict:
    """The model inputs of the first ``head`` tokens of ``context``: every per-token input
    ([1, length]: ids, masks, token types) cut there, the image inputs whole."""
    if context.keep is not None:
        return family.pruned_inputs(context)
    inputs = dict(context.inputs)
    length = inputs["input_ids"].shape[-1]
    return {name: value[:, :head] if getattr(value, "ndim", 0) == 2 and tuple(value.shape) == (1, length) else value
            for name, value in inputs.items()}


def _to_numpy(logits) -> np.ndarray:
    return logits.float().cpu().numpy()
