"""The draft's prefill: vision -> scorer -> kept visual tokens -> decoder context.

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
class DraftPrefill:
    """What the prefill decided: ``kept`` indices [K] (ascending) of ``visual_tokens``."""

    kept: np.ndarray
    visual_tokens: int
    selection: str


def prefill_draft(artifact: DraftArtifact, drafter: Drafter, image, question: str, options: DraftingOptions,
                  seed: int, trace: Callable[[dict], None] = lambda event: None) -> DraftPrefill:
    feeds = artifact.family.vision_inputs(image)
    visual, activity = artifact.family.pack_visual_tokens(feeds, *artifact.encode_image(feeds))  # [N, D], [N]
    n = visual.shape[0]
    ratio = options.keep_ratio if options.keep_ratio is not None else \
        artifact.manifest.pruning.get("keep_ratio", 1.0)
    k = keep_count(n, ratio, options.keep_tokens)
    kept = np.arange(n)
    if k < n:
        question_ids = artifact.tokenizer.encode(question.strip(), add_special_tokens=False).ids
        relevance, score = artifact.scorer.run(["relevance", "score"], {
            "image_features": visual, "activity": activity,
            "question_embeds": artifact.embed(question_ids or [artifact.manifest.tokenizer["pad_id"]])})
        kept = select(options.selection, visual, TokenScores(relevance, activity, score), k, seed=seed)
    layout = artifact.family.prompt_layout(question, feeds)
    drafter.prefill(artifact.family.draft_context(layout, visual, kept, options.positions))
    result = DraftPrefill(kept=kept, visual_tokens=n, selection=options.selection if k < n else "none")
    trace({"event": "prefill", "visual_tokens": n, "kept": int(len(kept)), "selection": result.selection})
    return result
