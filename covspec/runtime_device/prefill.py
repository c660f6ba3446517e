"""The draft's prefill: vision -> scorer -> kept visual tokens -> decoder context.

A conversation's follow-up question reuses what the first one saw (``SeenImage``) and
the draft's cache (see ``prefill_draft``).

``prefill_draft`` runs the artifact's vision graph on the image (``encode_image``:
its inputs checked against what the family's preprocessing produced), has the
family turn its outputs into the image's visual tokens (``visual_tokens``: e.g.
tiles packed), keeps the visual tokens the pruning settings ask for (``pruning.select`` over the scorer's outputs),
has the artifact's family build the draft's context (prompt text around the kept
visual tokens, with their positions) and prefills the drafter with it. Pruning
touches only the draft: it changes acceptance and draft speed, never the output.
Numpy and onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.options import DraftingOptions
from covspec.runtime_device.pruning import TokenScores, keep_count, select


@dataclass(frozen=True)
class SeenImage:
    """An image's visual tokens as the vision graph gave them (``feeds``: its inputs;
    ``visual`` [N, D], ``activity`` [N]) and the ones a question kept (``kept``), so that a
    conversation's next question about it runs no vision graph (``prefill_draft``'s ``seen``)."""

    feeds: dict
    visual: np.ndarray
    activity: np.ndarray
    kept: np.ndarray


@dataclass(frozen=True)
class DraftPrefill:
    """What the prefill decided: ``kept`` indices [K] (ascending) of ``visual_tokens``; ``seen``:
    the image's visual tokens, for the next question about it."""

    kept: np.ndarray
    visual_tokens: int
    selection: str
    seen: SeenImage | None = None


def prefill_draft(artifact: DraftArtifact, drafter: Drafter, image, question: str,
                  options: DraftingOptions, seed: int, trace: Callable[[dict], None] = lambda event: None,
                  template: str | None = None, seen: SeenImage | None = None) -> DraftPrefill:
    """Prefill ``drafter`` for ``question`` about ``image`` (a PIL image). A conversation's
    follow-up passes its ``template`` (the conversation so far, ``families/chat.py``) and
    what its first question ``seen`` of the same image (``image`` is then not read): no
    vision graph runs, and the first question's kept visual tokens stay, so the draft's cache
    keeps the image and the earlier turns and only the new rows run (``Drafter.prefill``'s
    ``reuse``); with ``options.reselect`` they are chosen again for the new question, and
    the draft's cache is prefilled again from the first visual token that changed."""
    if seen is not None:
        feeds, visual, activity, kept = seen.feeds, seen.visual, seen.activity, seen.kept
        selection = "kept from the first question"
        if options.reselect:
            kept, selection = _select(artifact, visual, activity, question, options, seed)
    else:
        feeds = artifact.family.vision_inputs(image)
        visual, activity = artifact.family.pack_visual_tokens(feeds, *artifact.encode_image(feeds))  # [N, D], [N]
        kept, selection = _select(artifact, visual, activity, question, options, seed)
    n = visual.shape[0]
    layout = artifact.family.prompt_layout(question, feeds, template=template)
    drafter.prefill(artifact.family.draft_context(layout, visual, kept, options.positions), reuse=seen is not None)
    result = DraftPrefill(kept=kept, visual_tokens=n, selection=selection,
                          seen=SeenImage(feeds, visual, activity, kept))
    trace({"event": "prefill", "visual_tokens": n, "kept": int(len(kept)), "selection": result.selection})
    return result


def _select(artifact: DraftArtifact, visual: np.ndarray, activity: np.ndarray, question: str,
            options: DraftingOptions, seed: int) -> tuple[np.ndarray, str]:
    """The visual tokens the pruning settings keep for ``question`` [K] ascending, and how chosen."""
    n = visual.shape[0]
    ratio = options.keep_ratio if options.keep_ratio is not None else \
        artifact.manifest.pruning.get("keep_ratio", 1.0)
    k = keep_count(n, ratio, options.keep_tokens)
    if k >= n:
        return np.arange(n), "none"
    question_ids = artifact.tokenizer.encode(question.strip(), add_special_tokens=False).ids
    relevance, score = artifact.scorer.run(["relevance", "score"], {
        "image_features": visual, "activity": activity,
        "question_embeds": artifact.embed(question_ids or [artifact.manifest.tokenizer["pad_id"]])})
    return select(options.selection, visual, TokenScores(relevance, activity, score), k, seed=seed), options.selection
