"""Train the toy target on ShapesVQA and distill the toy draft from it (CPU, seeded).

Recipe (a plain next-token loss alone plateaued near 55% of the held-out questions):
0. a short vision-only phase: the per-cell loss of (2) alone, on larger image
   batches, so shape kinds are recognized before the language model starts reading
   (training a trained model further starts instead with a probe-only phase: the
   fresh probes of (2) learn on a frozen model, so their first, random gradients
   do not shake its visual tokens);
1. the image prefix (``<s> question :`` + visual tokens) runs once per image and its
   KV cache is shared by that image's questions (descriptions and short answers run
   as two suffix groups);
2. auxiliary probe losses: the visual tokens of each 3x3 grid cell are pooled and
   linear heads classify the cell's kind (or empty) and color; the mean of all visual
   tokens must give every cell's kind and color (so a plain average, which is what
   an untrained attention computes, already carries the whole scene); each token
   must give its own cell, and its own cell's kind and color (one head shared by all
   tokens, so a shape's kind reads the same wherever it is: without it a token's kind
   was entangled with its cell and the LM could not look a shape up by content). They
   supervise the vision tower directly; the heads are discarded after training;
3. every short question an image affords (``shapes.every_question``), not one per type;
   loss on answer tokens only, descriptions and short answers weighted equally, and
   every short question type equally within them;
   AdamW, linear warmup then cosine decay;
4. the draft's loss is KL(target || draft) on answer positions (teacher logits on
   the fly, no grad) plus cross-entropy on the reference, plus the per-cell loss.

The learning curve (loss, per-cell accuracy, validation exact match per type,
teacher-forced) is returned row by row; this module writes no files itself.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from covspec.toy import shapes
from covspec.toy.batches import PROMPT_HEAD, Batch, encode, make_batch, pixel_values
from covspec.toy.models import PATCH_SIZE

CELL_PATCHES = shapes.CELL // PATCH_SIZE
PATCHES_PER_SIDE = shapes.IMAGE_SIZE // PATCH_SIZE
_rows, _cols = torch.meshgrid(torch.arange(PATCHES_PER_SIDE), torch.arange(PATCHES_PER_SIDE), indexing="ij")
PATCH_CELLS = ((_rows // CELL_PATCHES) * shapes.GRID + _cols // CELL_PATCHES).flatten()  # (P*P,) row-major


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    images_per_step: int = 8
    short_per_image: int | None = None  # None: every applicable short question
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    kl_weight: float = 1.0        # draft only
    eval_every: int = 100
    vision_steps: int = 0         # aux-only steps first (vision tower + projector)
    probe_steps: int = 0          # then probe-only steps (model frozen): fresh probes on a
                                  # trained model otherwise shake its visual tokens
    vision_images_per_step: int = 32
    validation_images: int = 48
    seed: int = 0


class CellHeads(torch.nn.Module):
    """Training-only probes on the visual tokens: each cell's kind and color from its
    pooled tokens, the whole scene (every cell's kind and color) from the mean of all
    tokens, and each token's own cell (so positions survive the projector)."""

    def __init__(self, hidden: int):
        super().__init__()
        cells = shapes.GRID * shapes.GRID
        self.kind = torch.nn.Linear(hidden, len(shapes.KINDS) + 1)
        self.color = torch.nn.Linear(hidden, len(shapes.COLORS) + 1)
        self.scene_kind = torch.nn.Linear(hidden, cells * (len(shapes.KINDS) + 1))
        self.scene_color = torch.nn.Linear(hidden, cells * (len(shapes.COLORS) + 1))
        self.cell = torch.nn.Linear(hidden, cells)
        self.token_kind = torch.nn.Linear(hidden, len(shapes.KINDS) + 1)
        self.token_color = torch.nn.Linear(hidden, len(shapes.COLORS) + 1)

    def forward(self, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        # visual: (B, P*P, D) -> cells (B, 9, D)
        b, _, d = visual.shape
        cells = shapes.GRID * shapes.GRID
        grid = visual.view(b, shapes.GRID, CELL_PATCHES, shapes.GRID, CELL_PATCHES, d)
        pooled = grid.mean(dim=(2, 4)).reshape(b, cells, d)
        scene = visual.mean(dim=1)
        return {"kind": self.kind(pooled), "color": self.color(pooled),
                "scene_kind": self.scene_kind(scene).view(b, cells, -1),
                "scene_color": self.scene_color(scene).view(b, cells, -1),
                "cell": self.cell(visual),
                "token_kind": self.token_kind(visual), "token_color": self.token_color(visual)}


def visual_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, D) projector outputs, CLS dropped, as the model feeds them to its LM."""
    out = model.model.get_image_features(pixels, vision_feature_layer=-1,
                                         vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


def answer_logits(model, tokenizer, batch: Batch, visual: torch.Tensor) -> list[torch.Tensor]:
    """Per suffix group, logits (N, S, V) of every suffix position after its image prefix."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    head_ids = torch.tensor(encode(tokenizer, PROMPT_HEAD))
    b = visual.shape[0]
    prefix = torch.cat([embed(head_ids).unsqueeze(0).expand(b, -1, -1), visual], dim=1)
    cache = lm(inputs_embeds=prefix, use_cache=True).cache
    prefix_len = prefix.shape[1]
    outputs = []
    for group in batch.groups:
        shared = DynamicCache([(layer.keys[group.rows], layer.values[group.rows]) for layer in cache.layers])
        positions = torch.arange(prefix_len, prefix_len + group.ids.shape[1]).unsqueeze(0)
        hidden = lm(inputs_embeds=embed(group.ids), cache=shared, use_cache=True,
                    position_ids=positions).last_hidden_state
        outputs.append(model.lm_head(hidden))
    return outputs


def cell_loss(heads: CellHeads, visual: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, float]:
    """Sum of the probes' cross-entropies, and the per-cell kind accuracy."""
    logits = heads(visual)
    targets = {"kind": batch.cell_kinds, "color": batch.cell_colors, "scene_kind": batch.cell_kinds,
               "scene_color": batch.cell_colors, "cell": PATCH_CELLS.expand(visual.shape[0], -1),
               "token_kind": batch.cell_kinds[:, PATCH_CELLS], "token_color": batch.cell_colors[:, PATCH_CELLS]}
    loss = sum(F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten()) for name in targets)
    kind_accuracy = (logits["token_kind"].argmax(-1) == targets["token_kind"]).float().mean().item()
    return loss, kind_accuracy


def answer_loss(logits: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Cross-entropy on answer tokens: descriptions and short answers weigh the same, and
    within the short answers every question type weighs the same, whatever their counts
    of questions and tokens (``every_question`` asks far more counts than colors)."""
    groups = []
    for lg, group in zip(logits, batch.groups):
        per_type = []
        for qtype in dict.fromkeys(group.types):
            rows = torch.tensor([i for i, t in enumerate(group.types) if t == qtype])
            labels = group.labels[rows]
            per_type.append(F.cross_entropy(lg[rows][labels != -100], labels[labels != -100]))
        groups.append(torch.stack(per_type).mean())
    return torch.stack(groups).mean()


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_exact_match(model, tokenizer, batches: list[Batch]) -> dict[str, float]:
    """Teacher-forced exact match per type: every answer token (and </s>) is the argmax.

    This equals greedy-decoding exact match, since greedy decoding reproduces the
    reference exactly when each step's argmax is the reference token.
    """
    model.eval()
    hits, totals = defaultdict(int), defaultdict(int)
    for batch in batches:
        for group, logits in zip(batch.groups, answer_logits(model, tokenizer, batch,
                                                             visual_tokens(model, batch.pixels))):
            mask = group.labels != -100
            right = ((logits.argmax(-1) == group.labels) | ~mask).all(dim=1)
            for qtype, ok in zip(group.types, right.tolist()):
                hits[qtype] += ok
                totals[qtype] += 1
    model.train()
    return {t: hits[t] / totals[t] for t in shapes.QUESTION_TYPES if totals[t]}


def validation_batches(tokenizer, count: int) -> list[Batch]:
    samples = [shapes.sample("validation", i) for i in range(count)]
    return [make_batch(tokenizer, samples[i:i + 16], None, random.Random(0)) for i in range(0, count, 16)]


class RunningMeans:
    """Means of named training scalars since the last learning-curve row; ticks the
    progress bar once per step."""

    def __init__(self, progress=None):
        self.progress = progress
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0

    def step(self, shown: dict[str, str], **values: float) -> None:
        for name, value in values.items():
            self.sums[name] += value
        self.steps += 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(**shown)

    def take(self) -> dict[str, float]:
        """The means so far (rounded), and start over."""
        means = {name: round(total / self.steps, 4) for name, total in self.sums.items()}
        self.sums.clear()
        self.steps = 0
        return means


def pretrain_probes(model, heads: CellHeads, config: TrainConfig, steps: int, *, train_vision: bool,
                    progress=None):
    """The per-cell loss alone for ``steps`` steps, on the vision tower, projector and probes
    (phase 0, ``train_vision``) or on the probes only (fresh probes before a continuation).
    Yields curve rows."""
    params = list(heads.parameters())
    if train_vision:
        params += list(model.model.vision_tower.parameters()) + \
            list(model.model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    started = time.monotonic()
    running = RunningMeans(progress)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        # negative indices: scenes of their own, disjoint from the answer phase's
        samples = [shapes.sample("train", -1 - step * config.vision_images_per_step - i)
                   for i in range(config.vision_images_per_step)]
        kinds, colors = zip(*(shapes.cell_targets(s.scene) for s in samples))
        batch = Batch(pixel_values([s.image() for s in samples]), torch.from_numpy(np.stack(kinds)),
                      torch.from_numpy(np.stack(colors)), [])
        with torch.set_grad_enabled(train_vision):
            visual = visual_tokens(model, batch.pixels)
        aux, kind_accuracy = cell_loss(heads, visual, batch)
        optimizer.zero_grad(set_to_none=True)
        aux.backward()
        optimizer.step()
        running.step({"aux": f"{aux.item():.3f}", "kind": f"{kind_accuracy:.2f}"},
                     aux=aux.item(), cell_kind_acc=kind_accuracy)
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            yield {"phase": "vision" if train_vision else "probes", "step": step + 1,
                   "seconds": round(time.monotonic() - started, 1), **running.take()}


def train(model, tokenizer, config: TrainConfig, *, teacher=None, progress=None):
    """Train ``model`` in place; with ``teacher``, distill from it. Yields learning-curve rows."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    heads = CellHeads(model.config.text_config.hidden_size)
    model.train()
    yield from pretrain_probes(model, heads, config, config.vision_steps, train_vision=True, progress=progress)
    yield from pretrain_probes(model, heads, config, config.probe_steps, train_vision=False, progress=progress)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    validation = validation_batches(tokenizer, config.validation_images)
    if teacher is not None:
        teacher.eval()
    model.train()
    next_image = 0
    started = time.monotonic()
    running = RunningMeans(progress)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        samples = [shapes.sample("train", next_image + i) for i in range(config.images_per_step)]
        next_image += config.images_per_step
        batch = make_batch(tokenizer, samples, config.short_per_image, rng)
        visual = visual_tokens(model, batch.pixels)
        aux, kind_accuracy = cell_loss(heads, visual, batch)
        logits = answer_logits(model, tokenizer, batch, visual)
        ce = answer_loss(logits, batch)
        picked = torch.cat([lg[g.labels != -100] for lg, g in zip(logits, batch.groups)])
        loss = ce + config.aux_weight * aux
        values = {}
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = answer_logits(teacher, tokenizer, batch, visual_tokens(teacher, batch.pixels))
                teacher_picked = torch.cat([lg[g.labels != -100] for lg, g in zip(teacher_logits, batch.groups)])
            kl = F.kl_div(F.log_softmax(picked, -1), F.log_softmax(teacher_picked, -1),
                          log_target=True, reduction="batchmean")
            loss = loss + config.kl_weight * kl
            values["kl"] = kl.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running.step({"ce": f"{ce.item():.3f}", "kind": f"{kind_accuracy:.2f}"}, **values, loss=loss.item(),
                     ce=ce.item(), aux=aux.item(), cell_kind_acc=kind_accuracy)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            row = {"phase": "answers", "step": step + 1, "seconds": round(time.monotonic() - started, 1),
                   "lr": optimizer.param_groups[0]["lr"], **running.take()}
            row.update({f"val_{t}": round(a, 3) for t, a in
                        validation_exact_match(model, tokenizer, validation).items()})
            yield row
