"""The draft as a generation sees it: what it prefills, and the proposer it drafts with.

``DraftModel`` is the interface of the one device loop (``loop.Generation``) to a draft:
its stop ids, vocabulary size and hash, a ``prefill`` that readies it for one image and
question, ``interrupted`` (a prefill under way ends at once) and ``proposer``, the
``ChunkProposer`` a strategy drafts its chunks with, built with the strategy's own
drafting policy. ``DecoderDraft`` is every draft that runs a decoder (``Drafter``):
its proposer is ``proposer.Proposer``. ``ArtifactDraft`` is the exported artifact's,
run with onnxruntime. A draft that runs no model (the ``bench load`` replay devices'
table) implements ``DraftModel`` with a proposer of its own.

``draft_rng`` is the draft's random stream, keyed apart from the edge's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from covspec.families.chat import History
from covspec.protocol.sampling import SamplingParams
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.options import DraftingOptions
from covspec.runtime_device.policy import DraftPolicy
from covspec.runtime_device.prefill import DraftPrefill, SeenImage, prefill_draft
from covspec.runtime_device.preprocess import load_image
from covspec.runtime_device.proposer import ChunkProposer, Proposer

DRAFT_STREAM = 0x6472616674  # "draft": keys the device's random stream apart from the edge's


def draft_rng(seed: int) -> np.random.Generator:
    """The draft's random stream. It must be independent of the edge's (seeded with the
    same user seed), or the joint output is biased: a separate stream is derived."""
    return np.random.default_rng([seed, DRAFT_STREAM])


class DraftModel(Protocol):
    """What a generation needs of the draft: its stop ids, vocabulary size and hash, a
    prefill that readies it for one image and question, and proposers."""

    eos_ids: Collection[int]
    vocab_size: int
    vocab_hash: str

    def prefill(self, image_bytes: bytes, question: str, options: DraftingOptions, seed: int,
                trace: Callable[[dict], None], history: History = ()) -> DraftPrefill:
        """Prefill the draft for ``question`` after a conversation's ``history`` (earlier
        (question, answer) turns); which visual tokens it kept."""

    def interrupted(self) -> AbstractContextManager:
        """A context within which the draft's work (a prefill under way in another thread)
        ends at once, raising there; the draft is prefilled afresh afterwards."""

    def proposer(self, codec, sampling: SamplingParams, policy: DraftPolicy, rng: np.random.Generator,
                 alternatives: bool) -> ChunkProposer:
        """A proposer drafting with ``policy`` (its chunk ends, its step timings) on the
        wire ``codec``; ``alternatives`` records the likeliest corrections (for branches)."""


class DecoderDraft:
    """A draft that runs a decoder (``drafter``): its proposer is the ``Proposer``."""

    drafter: Drafter
    eos_ids: Collection[int]

    def proposer(self, codec, sampling: SamplingParams, policy: DraftPolicy, rng: np.random.Generator,
                 alternatives: bool) -> Proposer:
        return Proposer(self.drafter, codec, sampling, policy, rng, self.eos_ids, alternatives=alternatives)


class ArtifactDraft(DecoderDraft):
    """The draft of an exported artifact, run with onnxruntime."""

    def __init__(self, artifact: DraftArtifact):
        self.artifact = artifact
        self.drafter = Drafter.from_artifact(artifact)
        self.eos_ids = artifact.eos_ids
        self.vocab_size = int(artifact.manifest.tokenizer["vocab_size"])
        self.vocab_hash = artifact.vocab_hash
        self.seen: tuple[bytes, SeenImage] | None = None     # the last image, for a conversation's follow-up

    def prefill(self, image_bytes: bytes, question: str, options: DraftingOptions, seed: int,
                trace: Callable[[dict], None], history: History = ()) -> DraftPrefill:
        """A first question runs the vision graph; a follow-up (``history``) about the image the
        draft saw last reuses its visual tokens and the draft's cache (``prefill_draft``)."""
        template = self.artifact.conversation_template(history) if history else None
        seen = self.seen[1] if history and self.seen is not None and self.seen[0] == image_bytes else None
        prefill = prefill_draft(self.artifact, self.drafter, None if seen else load_image(image_bytes), question,
                                options, seed, trace, template=template, seen=seen)
        self.seen = (image_bytes, prefill.seen)
        return prefill

    def interrupted(self) -> AbstractContextManager:
        return self.artifact.interrupted()
