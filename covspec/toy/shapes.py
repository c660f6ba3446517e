"""ShapesVQA: procedural scenes of colored shapes, their questions and checkable answers.

A *scene* is 1 to 6 shapes on a 3x3 grid of cells (at most one shape per cell); each
shape has a kind, a color and a size. Everything is a pure function of a seed: scene
``i`` of split ``s`` is drawn from ``random.Random(f"{s}:{i}")``, so the train,
validation and test splits never share a scene and never change.

Answers are word sequences from a closed vocabulary (numbers as words, positions as
two words such as "top left"); ``describe`` answers list every shape in row-major
order. This module knows nothing about tokenizers or models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID
BACKGROUND = (24, 24, 24)

KINDS = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {
    "red": (230, 40, 40), "yellow": (240, 220, 40), "green": (40, 190, 60),
    "cyan": (40, 220, 230), "blue": (50, 80, 240), "purple": (190, 60, 220),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

QUESTION_TYPES = ("color", "count_all", "count_color", "count_kind", "position", "exist", "describe")
SPLITS = ("train", "validation", "test")
DESCRIBE_QUESTION = "describe the image ."


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: int  # 0..8, row-major
    size: int  # pixels, bounding box side

    @property
    def position(self) -> str:
        return f"{ROWS[self.cell // GRID]} {COLUMNS[self.cell % GRID]}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # sorted by cell

    def at(self, cell: int) -> Shape | None:
        return next((s for s in self.shapes if s.cell == cell), None)


@dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str


def make_scene(rng: random.Random, min_shapes: int = 1, max_shapes: int = 6) -> Scene:
    count = rng.randint(min_shapes, max_shapes)
    cells = sorted(rng.sample(range(GRID * GRID), count))
    shapes = tuple(Shape(rng.choice(KINDS), rng.choice(list(COLORS)), cell, rng.randint(18, 26))
                   for cell in cells)
    return Scene(shapes)


def render(scene: Scene) -> Image.Image:
    """A ``IMAGE_SIZE`` square RGB image; each shape centered in its cell."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx = (shape.cell % GRID) * CELL + CELL / 2
        cy = (shape.cell // GRID) * CELL + CELL / 2
        h = shape.size / 2
        color = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=color)
        elif shape.kind == "square":
            draw.rectangle([cx - h * 0.85, cy - h * 0.85, cx + h * 0.85, cy + h * 0.85], fill=color)
        elif shape.kind == "triangle":
            draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=color)
        else:  # cross (plus sign)
            t = h * 0.35
            draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=color)
            draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=color)
    return image


def describe(scene: Scene) -> str:
    n = len(scene.shapes)
    noun = "shape" if n == 1 else "shapes"
    parts = [f"a {s.color} {s.kind} at {s.position}" for s in scene.shapes]
    return f"the image shows {NUMBERS[n]} {noun} : " + " , ".join(parts) + " ."


# -- one question and its answer, as both question sets ask it ---------------------------

def _color_qa(scene: Scene, kind: str) -> QA:
    return QA("color", f"what color is the {kind} ?", next(s.color for s in scene.shapes if s.kind == kind))


def _count_color_qa(scene: Scene, color: str) -> QA:
    return QA("count_color", f"how many {color} shapes are there ?",
              NUMBERS[sum(s.color == color for s in scene.shapes)])


def _count_kind_qa(scene: Scene, kind: str) -> QA:
    return QA("count_kind", f"how many {PLURALS[kind]} are there ?", NUMBERS[sum(s.kind == kind for s in scene.shapes)])


def _position_qa(shape: Shape) -> QA:
    return QA("position", f"where is the {shape.color} {shape.kind} ?", shape.position)


def _exist_qa(present: set[tuple[str, str]], color: str, kind: str) -> QA:
    return QA("exist", f"is there a {color} {kind} ?", "yes" if (color, kind) in present else "no")


def _unique_kinds(scene: Scene) -> list[str]:
    """The kinds that occur once (a color question names the shape by its kind alone)."""
    return [k for k in KINDS if sum(s.kind == k for s in scene.shapes) == 1]


def _uniquely_named(scene: Scene) -> list[Shape]:
    """The shapes whose (color, kind) occurs once (a position question names them so)."""
    pairs = [(s.color, s.kind) for s in scene.shapes]
    return [s for s in scene.shapes if pairs.count((s.color, s.kind)) == 1]


def _exist_question(rng: random.Random, scene: Scene) -> QA:
    present = {(s.color, s.kind) for s in scene.shapes}
    # sorted: iterating a set of strings follows the per-process hash seed
    colors = sorted({s.color for s in scene.shapes})
    kinds = sorted({s.kind for s in scene.shapes})
    hard = [(c, k) for c in colors for k in kinds if (c, k) not in present]
    roll = rng.random()
    if roll < 0.5:
        color, kind = rng.choice(sorted(present))
    elif roll < 0.8 and hard:
        color, kind = rng.choice(hard)
    else:
        absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        color, kind = rng.choice(absent)
    return _exist_qa(present, color, kind)


def question_of_type(qtype: str, rng: random.Random, scene: Scene) -> QA | None:
    """One question of ``qtype`` about ``scene``, or None when the type does not apply."""
    shapes = scene.shapes
    if qtype == "color":
        unique = _unique_kinds(scene)
        return _color_qa(scene, rng.choice(unique)) if unique else None
    if qtype == "count_all":
        return QA(qtype, "how many shapes are there ?", NUMBERS[len(shapes)])
    if qtype == "count_color":
        return _count_color_qa(scene, rng.choice([s.color for s in shapes] + list(COLORS)))
    if qtype == "count_kind":
        return _count_kind_qa(scene, rng.choice([s.kind for s in shapes] + list(KINDS)))
    if qtype == "position":
        unique = _uniquely_named(scene)
        return _position_qa(rng.choice(unique)) if unique else None
    if qtype == "exist":
        return _exist_question(rng, scene)
    if qtype == "describe":
        return QA(qtype, DESCRIBE_QUESTION, describe(scene)) if len(shapes) >= 2 else None
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def _one_of(rng: random.Random, options: list[str]) -> list[str]:
    """One of ``options`` at random, as a list; empty when there are none."""
    return rng.sample(options, min(1, len(options)))


def every_question(rng: random.Random, scene: Scene) -> list[QA]:
    """The short questions to train on about ``scene``: the color of each unique kind,
    the position of each unique (color, kind), how many shapes, how many of each color
    and kind present (and of one absent), and whether each present pair exists, plus as
    many absent pairs (hard ones first: a present color with a present kind).
    ``question_of_type`` asks one of each type; this asks most of them, so one image's
    visual tokens (computed once) teach every lookup they can."""
    shapes = scene.shapes
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    unique_kinds = _unique_kinds(scene)
    qas = [_color_qa(scene, s.kind) for s in shapes if s.kind in unique_kinds]
    qas += [_position_qa(s) for s in _uniquely_named(scene)]
    qas.append(question_of_type("count_all", rng, scene))
    asked_colors = sorted(set(colors)) + _one_of(rng, [c for c in COLORS if c not in colors])
    qas += [_count_color_qa(scene, c) for c in asked_colors]
    asked_kinds = sorted(set(kinds)) + _one_of(rng, [k for k in KINDS if k not in kinds])
    qas += [_count_kind_qa(scene, k) for k in asked_kinds]
    present = set(zip(colors, kinds))
    hard = [(c, k) for c in sorted(set(colors)) for k in sorted(set(kinds)) if (c, k) not in present]
    other = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present and (c, k) not in hard]
    absent = rng.sample(hard, min(len(hard), len(present)))
    absent += rng.sample(other, len(present) - len(absent))
    qas += [_exist_qa(present, c, k) for c, k in sorted(present) + absent]
    return qas


@dataclass(frozen=True)
class Sample:
    """One scene with one question of every type that applies to it."""
    split: str
    index: int
    scene: Scene
    qas: tuple[QA, ...]

    def image(self) -> Image.Image:
        return render(self.scene)


def sample(split: str, index: int) -> Sample:
    """Scene ``index`` of ``split`` (deterministic); ``describe`` applies from two shapes on."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = random.Random(f"{split}:{index}")
    scene = make_scene(rng)
    qas = tuple(qa for t in QUESTION_TYPES if (qa := question_of_type(t, rng, scene)) is not None)
    return Sample(split, index, scene, qas)


def held_out_questions(n_scenes: int = 250) -> list[tuple[Sample, QA]]:
    """The held-out test set: every applicable question of the first ``n_scenes`` test scenes."""
    return [(s, qa) for i in range(n_scenes) for s in [sample("test", i)] for qa in s.qas]


def vocabulary() -> list[str]:
    """Every word that can occur in a question or an answer, in a fixed order."""
    words = ["what", "color", "is", "the", "how", "many", "shapes", "shape", "are", "there", "where",
             "a", "at", "describe", "image", "shows", "yes", "no", "?", ".", ",", ":", "question", "answer"]
    words += list(KINDS) + list(PLURALS.values()) + list(COLORS) + list(ROWS) + list(COLUMNS) + list(NUMBERS)
    return list(dict.fromkeys(words))


def is_correct(prediction: str, reference: str) -> bool:
    """Exact match after whitespace normalization."""
    return prediction.split() == reference.split()


def described_shapes(description: str) -> set[tuple[str, str, str]]:
    """The (color, kind, position) triples a description states; unparsable parts are skipped."""
    body = description.split(":", 1)[-1].replace(" .", " ")
    triples = set()
    for part in body.split(","):
        words = part.split()
        if len(words) == 6 and words[0] == "a" and words[3] == "at":
            triples.add((words[1], words[2], f"{words[4]} {words[5]}"))
    return triples


def description_f1(prediction: str, reference: str) -> float:
    """Per-shape F1: a shape counts when its color, kind and position all are right."""
    predicted, expected = described_shapes(prediction), described_shapes(reference)
    hits = len(predicted & expected)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


def cell_targets(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell class ids (9,) for kind (0 = empty, 1.. = KINDS) and color (0 = empty, 1.. = COLORS)."""
    kinds = np.zeros(GRID * GRID, dtype=np.int64)
    colors = np.zeros(GRID * GRID, dtype=np.int64)
    names = list(COLORS)
    for s in scene.shapes:
        kinds[s.cell] = KINDS.index(s.kind) + 1
        colors[s.cell] = names.index(s.color) + 1
    return kinds, colors
