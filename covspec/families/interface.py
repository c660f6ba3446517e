"""The family contract: what a model family provides on each side, and what it returns.

A *family* owns everything architecture-specific (ARCHITECTURE.md, "Model families"), in three
halves that are imported separately:

- the **device half** (``DeviceHalf``): image preprocessing, the draft's prompt
  layout and its position ids. Numpy, PIL and tokenizers only: it never imports
  torch or transformers, not even indirectly.
- the **edge half** (``TargetHalf``): the target's prompt template, its context
  built from a question and an image, the opt-in pruned target inputs, EOS ids.
- the **export half** (``ExportHalf``): the graphs to trace (vision with its
  activity signal, decoder), the manifest's image, tokenizer and source sections,
  and the processor inputs the parity checks run on.

The values that cross the seam are defined here, so that callers stay
family-agnostic: a ``DraftContext`` may hold any number of image slots and 1-D or
multi-axis (M-RoPE) positions without the device loop knowing.

Every member is explicit. A half subclasses its protocol (``class LlavaDevice(DeviceHalf)``)
and inherits the documented default of each hook it does not need: ``pack_visual_tokens``
and ``vision_runs`` on the device, ``next_position`` and ``shortest_reused_prefix`` on the
edge, ``dynamic_resolution``
of a family. Callers call the hooks; they never ask whether a family has one. This module
imports numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# How kept visual tokens are numbered in the draft's context (``DeviceHalf.draft_context``):
# "original" keeps each kept token's position in the unpruned prompt (generated tokens
# continue after the full prompt, as on the target); "contiguous" renumbers the context.
POSITIONS = ("original", "contiguous")


class ModelFolderError(ValueError):
    """A folder is not a loadable model of a supported family."""


class UnsupportedModelError(ModelFolderError):
    """A model whose architecture, or one of whose sub-models, no family supports."""


class ImageSizeError(UnsupportedModelError):
    """An export size (``--image-size``) a dynamic-resolution family's processor would not keep."""


@dataclass(frozen=True)
class PromptLayout:
    """The draft's prompt as token ids split at the image slots.

    ``segments[i]`` is the text before image slot ``i``; the last segment follows the
    last slot, so there are ``len(segments) - 1`` image slots.
    """

    segments: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class DraftContext:
    """What the draft decoder prefills: the prompt with its kept visual tokens.

    ``positions`` has one column per row of ``embeds``: shape [S] for 1-D positions,
    [A, S] for A position axes (e.g. 3 for M-RoPE). Generated tokens continue at
    ``next_position`` (the same value on every axis). ``image_groups`` (optional, for
    a language model in which an image's tokens attend to each other bidirectionally,
    e.g. Gemma 3) numbers each row's image: 0 for text, k > 0 for the tokens of image
    k; the drafter feeds it to a decoder graph that takes ``image_groups``, and
    generated tokens are text (0).
    """

    embeds: np.ndarray       # [S, D] float32
    positions: np.ndarray    # [S] or [A, S] int64
    next_position: int
    image_groups: np.ndarray | None = None   # [S] int64, or None: every row is text

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class TargetContext:
    """The processed prompt of one edge session: model inputs on the model's device."""

    inputs: dict[str, Any]   # the processor's tensors (input_ids [1, L], pixel_values, ...)
    length: int              # context tokens the target's cache will hold (kept visual tokens only)
    keep: Any = None         # opt-in pruned target: LongTensor [K] of kept visual token indices


def past_names(num_layers: int) -> list[str]:
    """The decoder graph's KV-cache input names, key then value per layer."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """The decoder graph's KV-cache output names, key then value per layer."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class DecoderSpec:
    """The exported decoder's cache layout and sizes (the manifest's ``decoder`` section)."""

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


@dataclass(frozen=True)
class GraphTrace:
    """How to trace one graph with ``torch.onnx.export``.

    ``args`` are example inputs with batch >= 2 and non-trivial lengths, so no size
    collapses to a constant; ``axes`` names each dynamic axis per input/output
    (torchscript's ``dynamic_axes``, and the names written into the file); ``dims``
    mirrors ``args`` with ``torch.export.Dim`` objects (dynamo's ``dynamic_shapes``).
    """

    module: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    axes: dict[str, dict[int, str]]
    dims: tuple


class DeviceHalf(Protocol):
    """The device side of a family, built from an artifact's manifest (numpy only)."""

    def vision_inputs(self, image) -> dict[str, np.ndarray]:
        """The vision graph's feeds for one PIL image, preprocessed exactly as the
        model's own processor does (max abs difference at most 1e-5). Entries whose
        names are not inputs of the vision graph (e.g. the image's size) are not fed
        to it; they reach ``pack_visual_tokens``."""

    def pack_visual_tokens(self, feeds: Mapping[str, np.ndarray], features: np.ndarray,
                           activity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The image's N visual tokens in prompt order (features [N, D], activity [N]) from
        the vision graph's outputs for ``feeds``. Default: row 0, for a vision graph whose
        outputs for one image ([1, N, D], [1, N]) already are those tokens; a family that
        tiles an image (per-tile features [T, n, D], activity [T, n]) packs its tiles here
        (unpadded, with newline tokens, ...)."""
        return features[0], activity[0]

    def vision_runs(self, feeds: Mapping[str, np.ndarray]) -> list[Mapping[str, np.ndarray]]:
        """``feeds`` split into runs of the vision graph whose outputs, concatenated along
        axis 1 (tokens), equal one run's. Default: one run. A family whose graph treats its
        frames independently (e.g. tiles) splits them, so the tower's activations are held
        for a few frames at a time."""
        return [feeds]

    def prompt_layout(self, question: str, feeds: Mapping[str, np.ndarray] | None = None,
                      template: str | None = None) -> PromptLayout:
        """The prompt template filled with ``question``, tokenized as the processor
        does (special tokens included) and split at its image slots. ``feeds`` are
        ``vision_inputs``' output for the image: a family whose prompt depends on the
        image (e.g. its tile grid) reads it there; None stands for a square image.
        ``template``: a conversation's template (``families/chat.py``) instead of the
        artifact's single-question one."""

    def draft_context(self, layout: PromptLayout, image_features: np.ndarray, kept: np.ndarray,
                      positions: str) -> DraftContext:
        """Embeddings of the prompt text around the kept visual tokens, with positions.

        image_features: [N, D] (the vision graph's output for the image); kept: [K]
        ascending indices into it; positions: one of ``POSITIONS``. With every token
        kept, the context equals the processor's prompt (image slots expanded).
        """


class TargetHalf(Protocol):
    """The edge side of a family around one loaded target (torch)."""

    template: str   # the rendered single-image prompt, ``{question}`` where the question goes
    turns: Any      # the template's ``ChatTurns`` (``families/chat.py``), None: one question per session

    def context(self, question: str, image, keep: Sequence[int] | None = None,
                template: str | None = None) -> TargetContext:
        """Fill the template (``template``, a conversation's, if given) with ``question``
        and process it with ``image``.

        With ``keep`` (the opt-in pruned target), only those visual tokens will enter
        the context. Raises ``EdgeError(BAD_FIELD)`` for a question that carries the
        image placeholder, inputs the processor refuses, or ``keep`` out of range.
        """

    def pruned_inputs(self, context: TargetContext) -> dict[str, Any]:
        """Model inputs (``inputs_embeds`` [1, L', D], ``attention_mask``) holding only
        the kept visual tokens of ``context``, positions renumbered contiguously; or, for
        a family with ``next_position``, with ``position_ids`` keeping their original ones."""

    def next_position(self, context: TargetContext) -> int | None:
        """The position (on every axis) of the first token after ``context``, for a family
        whose positions are not the cache index (M-RoPE); the edge then gives every cached
        extension explicit positions ``next_position + (cache index - context.length)``
        instead of the model's own. Default: None (positions are the cache index)."""
        return None

    def shortest_reused_prefix(self, context: TargetContext) -> int | None:
        """The fewest leading tokens of ``context`` a cached prefix must cover for its KV to
        stand in for a prefill of them (the edge's prefix cache, ``runtime_edge/prefix_cache.py``):
        every token whose KV depends on the image, or on a later token, must lie inside it, so
        that the rest of the context can run as a plain cached extension. Default: None, this
        family's contexts never continue a cached prefix (the edge prefills them fresh)."""
        return None

    def eos_ids(self) -> set[int]:
        """EOS ids as ``generate`` uses them."""

    def vocab(self) -> Mapping[str, int]:
        """The tokenizer's token -> id mapping (for the vocabulary hash)."""


class ExportHalf(Protocol):
    """The export side of a family around one loaded draft model (torch)."""

    template: str                # as ``TargetHalf.template``; written into the manifest
    decoder_spec: DecoderSpec
    input_size: tuple[int, int]  # (width, height) the vision tower sees

    def vision_graph(self) -> GraphTrace:
        """``vision.onnx``: the vision inputs -> ``image_features [B, N, D]`` and
        ``activity [B, N]`` (per-token saliency for pruning); B counts images, or the
        tiles of one image for a family that packs them (``pack_visual_tokens``)."""

    def decoder_graph(self) -> GraphTrace:
        """``decoder.onnx``: ``inputs_embeds``, ``attention_mask``, ``position_ids`` and
        the past KV -> ``logits`` and the present KV; positions may skip values."""

    def embed_tokens(self) -> np.ndarray:
        """The LM's input embedding table [V, D] float32."""

    def processor_inputs(self, image, question: str) -> dict[str, Any]:
        """The model's own processor on ``image`` and the filled template (torch tensors)."""

    def vision_feeds(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The vision graph's feeds taken from ``processor_inputs``' output, with what the
        device half's ``pack_visual_tokens`` needs (as ``DeviceHalf.vision_inputs`` makes them)."""

    def image_section(self) -> dict:
        """The manifest's ``image`` section: what the device half needs to preprocess."""

    def tokenizer_section(self, tokenizer_file: Path) -> dict:
        """The manifest's ``tokenizer`` section (file, vocab_size, vocab_hash, bos_id,
        eos_ids, pad_id, image_token_id)."""

    def source_section(self) -> dict:
        """The family-specific part of the manifest's ``source`` (architecture, sub-models)."""


class Family(Protocol):
    """One model family: its name, the architectures it loads, and its three halves."""

    name: str                         # recorded in the manifest as ``source.family``
    architectures: tuple[str, ...]    # config.json ``architectures`` values it loads
    # True for a family whose target sees each image at its own resolution while the draft's
    # vision graph is exported at one fixed size, which ``exporter``'s ``image_size`` sets.
    dynamic_resolution: bool = False

    def device(self, *, image: Mapping, tokenizer_section: Mapping, prompt_template: str, tokenizer,
               embed_tokens: np.ndarray) -> DeviceHalf:
        """The device half from an artifact's manifest sections, its ``tokenizers.Tokenizer``
        and embedding table [V, D]; ``ArtifactError`` names a missing field."""

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
        """(model, processor) from a local folder of this family, in eval mode; nothing is fetched."""

    def target(self, model, processor) -> TargetHalf:
        """The edge half around a loaded target."""

    def exporter(self, model, processor, image_size: tuple[int, int] | None = None) -> ExportHalf:
        """The export half around a loaded draft; ``UnsupportedModelError`` for sub-models
        it cannot export. ``image_size`` (width, height; None: the family's default) is the
        draft's fixed vision input size of a ``dynamic_resolution`` family (``ImageSizeError``
        for one its processor would not keep); other families take None only."""
