"""Build the toy world: train the target, distill the draft, save both folders,
the learning curve (``learning_curve.json`` and ``.csv``) and the demo samples.

Output layout under ``out``: ``target/``, ``draft/`` (loadable with plain
``from_pretrained``), ``learning_curve.json``, ``learning_curve.csv``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from covspec.toy.models import new_model, save_toy_model, toy_tokenizer
from covspec.toy.train import TrainConfig, train


@dataclass(frozen=True)
class BuildPlan:
    target: TrainConfig
    draft: TrainConfig


FULL = BuildPlan(
    target=TrainConfig(steps=1800, lr=2e-3, warmup=60, vision_steps=150, curriculum=0.25, eval_every=100),
    draft=TrainConfig(steps=600, lr=3e-3, warmup=40, vision_steps=100, eval_every=100, seed=1),
)
QUICK = BuildPlan(
    target=TrainConfig(steps=2, images_per_step=2, warmup=1, vision_steps=1, vision_images_per_step=2,
                       eval_every=2, validation_images=2),
    draft=TrainConfig(steps=2, images_per_step=2, warmup=1, vision_steps=1, vision_images_per_step=2,
                      eval_every=2, validation_images=2, seed=1),
)


def _run(role: str, model, config: TrainConfig, log, teacher=None) -> list[dict]:
    rows = []
    with tqdm(total=config.vision_steps + config.steps, desc=f"train {role}", unit="step") as progress:
        for row in train(model, toy_tokenizer(), config, teacher=teacher, progress=progress):
            row = {"model": role, **row}
            rows.append(row)
            log(row)
    return rows


def write_curve(rows: list[dict], out: Path) -> None:
    (out / "learning_curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def build(out: str | Path, plan: BuildPlan, *, log=print, target_dir: str | Path | None = None,
          threads: int = 1) -> Path:
    """Train (or, with ``target_dir``, reuse) the target, distill the draft, save everything."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log({"plan": {"target": asdict(plan.target), "draft": asdict(plan.draft)}})
    rows = []
    if target_dir is None:
        target = new_model("target", seed=plan.target.seed)
        rows += _run("target", target, plan.target, log)
        save_toy_model(target, out / "target")
    else:
        from transformers import LlavaForConditionalGeneration
        target = LlavaForConditionalGeneration.from_pretrained(target_dir)
        save_toy_model(target, out / "target")
    draft = new_model("draft", seed=plan.draft.seed)
    rows += _run("draft", draft, plan.draft, log, teacher=target)
    save_toy_model(draft, out / "draft")
    write_curve(rows, out)
    return out
