"""Bundled demo samples: a few held-out test scenes as PNGs plus ``samples.json``.

``samples.json`` is a list of ``{"image": "<file>.png", "split": "test", "index": i,
"questions": [{"type", "question", "answer"}, ...]}``; image paths are relative to
the folder. The scenes come from the test split, so no model was trained on them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from covspec.toy import shapes

DEMO_INDICES = (0, 2, 5, 7)


def write_samples(folder: str | Path, indices=DEMO_INDICES) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in indices:
        sample = shapes.sample("test", index)
        if not any(qa.type == "describe" for qa in sample.qas):
            raise ValueError(f"test scene {index} has no describe question; pick another demo scene")
        name = f"test_{index:04d}.png"
        sample.image().save(folder / name)
        entries.append({"image": name, "split": "test", "index": index,
                        "questions": [{"type": qa.type, "question": qa.question, "answer": qa.answer}
                                      for qa in sample.qas]})
    (folder / "samples.json").write_text(json.dumps(entries, indent=1) + "\n")
    return folder


def bundled_samples_dir() -> Path:
    return Path(str(resources.files("covspec.toy") / "samples"))


def load_samples(folder: str | Path | None = None) -> list[dict]:
    """The entries of ``samples.json`` with ``image`` made an absolute path."""
    folder = Path(folder) if folder is not None else bundled_samples_dir()
    entries = json.loads((folder / "samples.json").read_text())
    return [{**e, "image": str(folder / e["image"])} for e in entries]
