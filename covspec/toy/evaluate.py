"""Evaluate toy models through plain transformers: accuracy, agreement, decode time.

Everything here goes through ``LlavaProcessor`` and ``model.generate`` /
``model(...)`` exactly as a user of a saved folder would; nothing from training is
reused. Accuracy is greedy exact match per question type plus the per-shape F1 of
descriptions; agreement is the draft's top-1 match with the target, teacher-forced
on the target's own greedy answer.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from covspec.families.common import fill_prompt, prompt_template
from covspec.toy import shapes


def _inputs(processor, items: list[tuple[shapes.Sample, str]]):
    template = prompt_template(processor)
    processor.tokenizer.padding_side = "left"
    return processor(images=[s.image() for s, _ in items],
                     text=[fill_prompt(template, q) for _, q in items],
                     padding=True, return_tensors="pt")


@torch.no_grad()
def greedy_answers(model, processor, items: list[tuple[shapes.Sample, str]], *,
                   batch_size: int = 32, max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to (sample, question) pairs, batched with left padding."""
    answers = []
    for start in range(0, len(items), batch_size):
        inputs = _inputs(processor, items[start:start + batch_size])
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [" ".join(a.split()) for a in answers]


def accuracy_report(model, processor, questions: list[tuple[shapes.Sample, shapes.QA]],
                    **kwargs) -> dict[str, dict[str, float]]:
    """Per type: exact-match accuracy and count; for ``describe`` also the mean per-shape F1."""
    # descriptions are long: batch them together so short answers do not wait on them
    order = sorted(range(len(questions)), key=lambda i: questions[i][1].type == "describe")
    answers = greedy_answers(model, processor, [(questions[i][0], questions[i][1].question) for i in order],
                             **kwargs)
    hits, f1s, totals = defaultdict(int), defaultdict(float), defaultdict(int)
    for i, answer in zip(order, answers):
        qa = questions[i][1]
        totals[qa.type] += 1
        hits[qa.type] += shapes.is_correct(answer, qa.answer)
        if qa.type == "describe":
            f1s[qa.type] += shapes.description_f1(answer, qa.answer)
    report = {t: {"exact_match": hits[t] / totals[t], "n": totals[t]} for t in shapes.QUESTION_TYPES if totals[t]}
    if "describe" in report:
        report["describe"]["f1"] = f1s["describe"] / totals["describe"]
    return report


@torch.no_grad()
def draft_agreement(target, draft, processor, samples: list[shapes.Sample]) -> float:
    """Fraction of answer positions where the draft's argmax equals the target's,
    both teacher-forced on the target's greedy answer to ``describe the image .``."""
    items = [(s, shapes.DESCRIBE_QUESTION) for s in samples]
    answers = greedy_answers(target, processor, items)
    template = prompt_template(processor)
    agree = total = 0
    for (sample, question), answer in zip(items, answers):
        prompt = fill_prompt(template, question)
        inputs = processor(images=[sample.image()], text=[f"{prompt} {answer} </s>"], return_tensors="pt")
        prompt_len = processor(images=[sample.image()], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        # position t predicts token t + 1: compare predictions of every answer token and </s>
        t = target(**inputs).logits[0, prompt_len - 1:-1].argmax(-1)
        d = draft(**inputs).logits[0, prompt_len - 1:-1].argmax(-1)
        agree += (t == d).sum().item()
        total += t.numel()
    return agree / total


@torch.no_grad()
def decode_ms_per_token(model, processor, sample: shapes.Sample, *, tokens: int = 40, repeats: int = 3) -> dict:
    """Median one-token greedy decode step (KV cache, eager) and prefill time, in ms."""
    inputs = _inputs(processor, [(sample, shapes.DESCRIBE_QUESTION)])
    steps, prefills = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(**inputs, use_cache=True)
        prefills.append(time.perf_counter() - start)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        length = inputs["input_ids"].shape[1]
        for i in range(tokens):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True,
                        attention_mask=torch.ones(1, length + i + 1, dtype=torch.long))
            steps.append(time.perf_counter() - start)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return {"decode_ms": 1000 * statistics.median(steps), "prefill_ms": 1000 * statistics.median(prefills)}


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
