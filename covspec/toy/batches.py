"""Training batches: ShapesVQA samples as pixel tensors and token-id sequences.

A sequence is split where the image ends. The *prefix* ``<s> question : <image>*N`` is
the same for every question about an image, so a batch holds each image once and
each question as a *suffix* ``{question} answer : {answer} </s>`` tied to its image
row. Suffixes are grouped by kind (descriptions, short answers) and right-padded
within a group, so causal attention never sees a pad before a real token. The
encoding matches what ``LlavaProcessor`` makes of ``prompt_template``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from covspec.toy import shapes

PROMPT_HEAD = "<s> question :"
ANSWER_CUE = "answer :"
PAD_ID, EOS_ID = 0, 2


def pixel_values(images) -> torch.Tensor:
    """(B, 3, H, W) float: RGB scaled to [0, 1], normalized with mean = std = 0.5."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


@dataclass
class SuffixGroup:
    rows: torch.Tensor     # (N,) image row of each suffix
    ids: torch.Tensor      # (N, S) suffix token ids, right-padded with PAD_ID
    labels: torch.Tensor   # (N, S) next-token targets on answer positions, -100 elsewhere
    types: list[str]       # question type of each suffix


@dataclass
class Batch:
    pixels: torch.Tensor       # (B, 3, H, W)
    cell_kinds: torch.Tensor   # (B, 9) 0 = empty
    cell_colors: torch.Tensor  # (B, 9) 0 = empty
    groups: list[SuffixGroup]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def suffix_group(tokenizer, items: list[tuple[int, shapes.QA]]) -> SuffixGroup:
    seqs, labels = [], []
    for _, qa in items:
        head = encode(tokenizer, f"{qa.question} {ANSWER_CUE}")
        answer = encode(tokenizer, qa.answer) + [EOS_ID]
        seq = head + answer
        # position t predicts token t + 1; the cue's ":" predicts the first answer token
        label = [-100] * (len(head) - 1) + answer + [-100]
        seqs.append(seq)
        labels.append(label)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, label) in enumerate(zip(seqs, labels)):
        ids[i, :len(seq)] = torch.tensor(seq)
        lab[i, :len(label)] = torch.tensor(label)
    rows = torch.tensor([row for row, _ in items], dtype=torch.long)
    return SuffixGroup(rows, ids, lab, [qa.type for _, qa in items])


def make_batch(tokenizer, samples: list[shapes.Sample], per_image: int | None, rng: random.Random) -> Batch:
    """Each image with its description (when it has one) and ``per_image`` of its short
    questions (``shapes.every_question``) drawn at random (all of them when ``per_image``
    is None)."""
    describe, short = [], []
    for row, s in enumerate(samples):
        shorts = shapes.every_question(rng, s.scene)
        if per_image is not None:
            shorts = rng.sample(shorts, min(per_image, len(shorts)))
        short += [(row, qa) for qa in shorts]
        describe += [(row, qa) for qa in s.qas if qa.type == "describe"]
    kinds, colors = zip(*(shapes.cell_targets(s.scene) for s in samples))
    groups = [suffix_group(tokenizer, items) for items in (describe, short) if items]
    return Batch(pixel_values([s.image() for s in samples]), torch.from_numpy(np.stack(kinds)),
                 torch.from_numpy(np.stack(colors)), groups)
