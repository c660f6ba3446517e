"""The parity checks that are part of every export (stored in the manifest).

- fp32: logits of the ONNX chain (vision -> embeddings -> decoder, the prompt run as
  two chunks so the KV-cache path is exercised) against the PyTorch model on the
  same input: ``max_abs_diff_logits <= FP32_LOGITS_BOUND`` else ``ParityError``;
  the vision outputs and the scorer are compared too.
- greedy: ``GREEDY_TOKENS`` tokens decoded through the fp32 graphs with the KV cache
  (numpy) must equal PyTorch ``generate(do_sample=False)``, else ``ParityError``.
- int8/int4: top-1 agreement of the quantized chain with fp32, teacher-forced over at
  least ``AGREEMENT_POSITIONS`` text positions per sample (the prompt's text after the
  image and an fp32 greedy continuation with EOS suppressed), summed over samples.

The samples are ``TOY_SAMPLES`` held-out ShapesVQA scenes with the description
question when the model uses the toy vocabulary (a toy draft or target), otherwise
one fixed random image with a fixed question. fp32 checks use the first sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from covspec.export.errors import ParityError
from covspec.export.onnx_run import OnnxVLM, session
from covspec.export.scorer import TokenScorer

FP32_LOGITS_BOUND = 1e-4
GREEDY_TOKENS = 16
AGREEMENT_POSITIONS = 64
DEFAULT_QUESTION = "what color is the circle ?"
SAMPLE_SEED = 0
TOY_SAMPLES = 4


@dataclass
class Sample:
    """One prompt for parity: ``input_ids [1,T]`` (image tokens expanded), ``pixel_values``."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    description: str


def sample_input(processor, template: str, image=None, question: str = DEFAULT_QUESTION,
                 description: str | None = None) -> Sample:
    """Tokenize ``question`` with one image through the model's own processor.

    Without ``image``, a fixed random RGB image at the processor's input size.
    """
    from PIL import Image

    if image is None:
        crop = processor.image_processor.crop_size
        size = (crop["width"], crop["height"]) if crop else (224, 224)
        pixels = np.random.default_rng(SAMPLE_SEED).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        description = description or f"fixed random {size[0]}x{size[1]} image (seed {SAMPLE_SEED})"
    prompt = template.replace("{question}", question)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    return Sample(batch["input_ids"].numpy().astype(np.int64), batch["pixel_values"].numpy().astype(np.float32),
                  f"{description or 'image'}; question {question!r}")


def toy_samples(processor, template: str, vocab_hash: str, count: int = TOY_SAMPLES) -> list[Sample]:
    """Held-out ShapesVQA scenes 0..count-1 with the description question, if the model
    speaks the toy vocabulary (its vocabulary hash equals the toy tokenizer's); else []."""
    from covspec.hf.folder import build_word_tokenizer
    from covspec.protocol.vocab import vocab_hash as hash_of
    from covspec.toy import shapes

    toy_vocab = build_word_tokenizer(shapes.vocabulary()).get_vocab(with_added_tokens=True)
    if hash_of(toy_vocab) != vocab_hash:
        return []
    return [sample_input(processor, template, shapes.sample("test", i).image(), shapes.DESCRIBE_QUESTION,
                         f"ShapesVQA test scene {i}") for i in range(count)]


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check_fp32(model, adapter, runner: OnnxVLM, scorer_path, sample: Sample) -> dict:
    """fp32 ONNX vs PyTorch on ``sample``: logits, vision outputs, scorer, greedy tokens."""
    input_ids = torch.from_numpy(sample.input_ids)
    pixel_values = torch.from_numpy(sample.pixel_values)
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixel_values).logits.numpy()
        features, activity = adapter.vision(pixel_values)
    split = min(3, sample.input_ids.shape[1] - 1)
    logits = runner.prefill_logits(sample.input_ids, sample.pixel_values, split=split)
    onnx_features, onnx_activity = runner.encode_image(sample.pixel_values)

    question = runner.embed_tokens[sample.input_ids[0, -6:]]
    with torch.no_grad():
        relevance, score = TokenScorer()(features[0], activity[0], torch.from_numpy(question))
    onnx_relevance, onnx_score = session(scorer_path).run(None, {
        "image_features": onnx_features[0], "activity": onnx_activity[0], "question_embeds": question})

    report = {
        "sample": sample.description,
        "positions": int(sample.input_ids.shape[1]),
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
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values,
                                   attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS)
    expected = generated[0, input_ids.shape[1]:].tolist()
    tokens = runner.greedy(sample.input_ids, sample.pixel_values, GREEDY_TOKENS, GREEDY_TOKENS)
    matched = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
    report["greedy_tokens"] = len(expected)
    report["greedy_match_tokens"] = matched
    if tokens != expected:
        raise ParityError(f"greedy decode through the fp32 ONNX graphs diverges from PyTorch generate at "
                          f"token {matched}: {tokens} vs {expected}.")
    return report


@dataclass
class AgreementReference:
    """The fp32 side of top-1 agreement for one sample: ``sequence [1,L]`` (prompt + fp32
    greedy continuation), its logits at positions ``first..L-2`` (each predicting a text
    token; at least ``AGREEMENT_POSITIONS`` of them) and the sample's pixels."""

    sequence: np.ndarray
    first: int
    logits: np.ndarray
    pixel_values: np.ndarray


def agreement_references(reference: OnnxVLM, samples: list[Sample]) -> list[AgreementReference]:
    references = []
    for sample in samples:
        ids = sample.input_ids
        first = int(np.flatnonzero(ids[0] == reference.image_token_id).max())
        continuation = max(GREEDY_TOKENS, AGREEMENT_POSITIONS - (ids.shape[1] - 1 - first))
        tokens = reference.greedy(ids, sample.pixel_values, continuation, continuation)
        sequence = np.concatenate([ids, np.array([tokens], np.int64)], axis=1)
        logits = reference.prefill_logits(sequence, sample.pixel_values)[0, first:-1]
        references.append(AgreementReference(sequence, first, logits, sample.pixel_values))
    return references


def top1_agreement(candidate: OnnxVLM, references: list[AgreementReference]) -> dict:
    """Teacher-forced top-1 agreement of ``candidate`` with the fp32 references."""
    agree, diff = [], 0.0
    for ref in references:
        got = candidate.prefill_logits(ref.sequence, ref.pixel_values)[0, ref.first:-1]
        agree.append(ref.logits.argmax(-1) == got.argmax(-1))
        diff = max(diff, _max_diff(got, ref.logits))
    agree = np.concatenate(agree)
    return {"top1_agreement": float(agree.mean()), "positions": int(agree.size), "samples": len(references),
            "max_abs_diff_logits": diff}
