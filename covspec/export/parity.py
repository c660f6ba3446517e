"""The parity checks that are part of every export (stored in the manifest).

The exported graphs run exactly as the device runs them (``ExportedDraft``): the
vision graph, then the family's device half builds the draft context (prompt text
around every visual token), then the device's own ``Drafter`` prefills it and feeds
generated tokens as plain text. The PyTorch side is the model on its own
processor's inputs, so the checks also prove that the device's prompt layout
equals the processor's.

- fp32: logits of every prompt position, the vision outputs and the scorer against
  PyTorch on the same input: ``max_abs_diff_logits <= FP32_LOGITS_BOUND`` else
  ``ParityError``.
- greedy: ``GREEDY_TOKENS`` tokens decoded through the fp32 graphs with the KV cache
  must equal PyTorch ``generate(do_sample=False)``, and their logits stay within the
  same bound, else ``ParityError``.
- int8/int4: top-1 agreement of the quantized chain with fp32, teacher-forced over at
  least ``AGREEMENT_POSITIONS`` text positions per sample (the prompt's text after
  the image and an fp32 greedy continuation with EOS suppressed), summed over samples.

The samples are the ``ParityPrompt``s the caller supplies (the toy world supplies
ShapesVQA scenes for models that speak its vocabulary), else one fixed random image
with a fixed question. fp32 checks use the first sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covspec.export.errors import ParityError
from covspec.export.scorer import TokenScorer
from covspec.families import DeviceHalf, DraftContext, ExportHalf
from covspec.runtime_device.artifact import open_graph, run_vision
from covspec.runtime_device.drafter import Drafter

FP32_LOGITS_BOUND = 1e-4
GREEDY_TOKENS = 16
AGREEMENT_POSITIONS = 64
DEFAULT_QUESTION = "what color is the circle ?"
SAMPLE_SEED = 0


@dataclass(frozen=True)
class ParityPrompt:
    """An image (PIL) and a question to check parity on; ``description`` names them in the report."""

    image: Any
    question: str
    description: str


@dataclass
class Sample:
    """A parity prompt through the model's own processor."""

    question: str
    inputs: dict[str, Any]               # the processor's torch tensors (input_ids [1, T], ...)
    vision_feeds: dict[str, np.ndarray]  # the vision graph's feeds taken from ``inputs``
    description: str


def default_prompt(half: ExportHalf) -> ParityPrompt:
    """A fixed random RGB image at the model's input size, with ``DEFAULT_QUESTION``."""
    from PIL import Image

    width, height = half.input_size
    pixels = np.random.default_rng(SAMPLE_SEED).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return ParityPrompt(Image.fromarray(pixels), DEFAULT_QUESTION,
                        f"fixed random {width}x{height} image (seed {SAMPLE_SEED})")


def sample_input(half: ExportHalf, prompt: ParityPrompt) -> Sample:
    inputs = half.processor_inputs(prompt.image, prompt.question)
    return Sample(prompt.question, inputs, half.vision_feeds(inputs),
                  f"{prompt.description}; question {prompt.question!r}")


class ExportedDraft:
    """Exported vision and decoder graphs run through the device's family half and ``Drafter``."""

    def __init__(self, vision: Path, decoder: Path, decoder_spec: dict, family: DeviceHalf,
                 embed_tokens: np.ndarray, eos_ids: list[int]):
        self.vision = open_graph(vision)
        self.family = family
        self.embed_tokens = embed_tokens                                       # [V, D]
        self.eos_ids = list(eos_ids)
        self.drafter = Drafter(open_graph(decoder), decoder_spec,
                               lambda ids: embed_tokens[np.asarray(ids, dtype=np.int64)])

    def image_features(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """The vision graph's outputs for the sample's image: ``image_features [B, n, D]`` and
        ``activity [B, n]`` (one row per image, or per tile)."""
        return run_vision(self.vision, sample.vision_feeds)

    def visual_tokens(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """The sample image's visual tokens [N, D] and activity [N], as the device packs them."""
        return self.family.pack_visual_tokens(sample.vision_feeds, *self.image_features(sample))

    def prompt_logits(self, sample: Sample, continuation: list[int] = ()) -> tuple[np.ndarray, int]:
        """Prefill the sample's full draft context, then ``continuation`` as generated tokens,
        in one pass -> (logits [S + n, V], text tokens after the image)."""
        features = self.visual_tokens(sample)[0]
        layout = self.family.prompt_layout(sample.question, sample.vision_feeds)
        context: DraftContext = self.family.draft_context(layout, features, np.arange(features.shape[0]),
                                                          "original")
        expected = int(sample.inputs["input_ids"].shape[1])
        if len(context) != expected:
            raise ParityError(f"the device's draft context has {len(context)} entries but the model's processor "
                              f"makes {expected} prompt tokens ({sample.description}).")
        return self.drafter.prefill_rows(context, continuation), len(layout.segments[-1])

    def greedy(self, sample: Sample, count: int) -> tuple[list[int], np.ndarray]:
        """``count`` greedy tokens with EOS suppressed, decoded with the KV cache ->
        (tokens, the logits that chose each token [count, V])."""
        prompt, _ = self.prompt_logits(sample)
        rows, tokens = [prompt[-1]], []
        while True:
            scores = rows[-1].copy()
            scores[self.eos_ids] = -np.inf
            tokens.append(int(scores.argmax()))
            if len(tokens) == count:
                return tokens, np.stack(rows)
            rows.append(self.drafter.feed(tokens[-1:])[-1])

    def teacher_forced(self, sample: Sample, continuation: list[int]) -> np.ndarray:
        """Logits [tail + n, V] predicting the prompt's text after the image and each of
        the ``n`` continuation tokens, the continuation fed as generated tokens (all of
        it, so that a dynamically quantized graph sees the whole sequence in one pass)."""
        logits, tail = self.prompt_logits(sample, continuation)
        return logits[len(logits) - len(continuation) - tail - 1:-1]


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check_fp32(model, half: ExportHalf, runner: ExportedDraft, scorer_path: Path, sample: Sample) -> dict:
    """fp32 ONNX vs PyTorch on ``sample``: logits, vision outputs, scorer, greedy tokens."""
    vision = half.vision_graph()
    input_ids = sample.inputs["input_ids"]
    with torch.no_grad():
        reference = model(**sample.inputs).logits[0].numpy()
        features, activity = vision.module(*(torch.from_numpy(sample.vision_feeds[name])
                                             for name in vision.input_names))
    logits, _ = runner.prompt_logits(sample)
    onnx_features, onnx_activity = runner.image_features(sample)

    question = runner.embed_tokens[input_ids[0, -6:].numpy()]
    with torch.no_grad():
        relevance, score = TokenScorer()(features[0], activity[0], torch.from_numpy(question))
    onnx_relevance, onnx_score = open_graph(scorer_path).run(None, {
        "image_features": onnx_features[0], "activity": onnx_activity[0], "question_embeds": question})

    report = {
        "sample": sample.description,
        "positions": int(input_ids.shape[1]),
        "max_abs_diff_logits": _max_diff(logits, reference),
        "max_abs_diff_image_features": _max_diff(onnx_features, features.numpy()),
        "max_abs_diff_activity": _max_diff(onnx_activity, activity.numpy()),
        "max_abs_diff_scorer": max(_max_diff(onnx_relevance, relevance.numpy()),
                                   _max_diff(onnx_score, score.numpy())),
        "bound": FP32_LOGITS_BOUND,
    }
    worst = max(report["max_abs_diff_logits"], report["max_abs_diff_image_features"])
    if not worst <= FP32_LOGITS_BOUND:
        raise ParityError(f"fp32 ONNX disagrees with PyTorch: max abs diff {worst:.3g} "
                          f"(logits {report['max_abs_diff_logits']:.3g}) > {FP32_LOGITS_BOUND:g}.")

    with torch.no_grad():
        generated = model.generate(**sample.inputs, do_sample=False, max_new_tokens=GREEDY_TOKENS,
                                   min_new_tokens=GREEDY_TOKENS, output_logits=True, return_dict_in_generate=True)
    expected = generated.sequences[0, input_ids.shape[1]:].tolist()
    tokens, step_logits = runner.greedy(sample, GREEDY_TOKENS)
    matched = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
    report["greedy_tokens"] = len(expected)
    report["greedy_match_tokens"] = matched
    if tokens != expected:
        raise ParityError(f"greedy decode through the fp32 ONNX graphs diverges from PyTorch generate at "
                          f"token {matched}: {tokens} vs {expected}.")
    report["max_abs_diff_greedy_logits"] = _max_diff(step_logits, torch.cat(generated.logits).numpy())
    if not report["max_abs_diff_greedy_logits"] <= FP32_LOGITS_BOUND:
        raise ParityError(f"fp32 ONNX greedy-step logits disagree with PyTorch generate: max abs diff "
                          f"{report['max_abs_diff_greedy_logits']:.3g} > {FP32_LOGITS_BOUND:g}.")
    return report


@dataclass
class AgreementReference:
    """The fp32 side of top-1 agreement for one sample: its fp32 greedy ``continuation``
    and the teacher-forced logits over the prompt's text after the image and the
    continuation (at least ``AGREEMENT_POSITIONS`` rows)."""

    sample: Sample
    continuation: list[int]
    logits: np.ndarray


def agreement_references(reference: ExportedDraft, samples: list[Sample]) -> list[AgreementReference]:
    references = []
    for sample in samples:
        tail = len(reference.family.prompt_layout(sample.question, sample.vision_feeds).segments[-1])
        count = max(GREEDY_TOKENS, AGREEMENT_POSITIONS - tail)
        continuation, _ = reference.greedy(sample, count)
        references.append(AgreementReference(sample, continuation, reference.teacher_forced(sample, continuation)))
    return references


def top1_agreement(candidate: ExportedDraft, references: list[AgreementReference]) -> dict:
    """Teacher-forced top-1 agreement of ``candidate`` with the fp32 references."""
    agree, diff = [], 0.0
    for ref in references:
        got = candidate.teacher_forced(ref.sample, ref.continuation)
        agree.append(ref.logits.argmax(-1) == got.argmax(-1))
        diff = max(diff, _max_diff(got, ref.logits))
    agree = np.concatenate(agree)
    return {"top1_agreement": float(agree.mean()), "positions": int(agree.size), "samples": len(references),
            "max_abs_diff_logits": diff}
