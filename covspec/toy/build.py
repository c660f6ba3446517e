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
    target_continued: TrainConfig  # more steps on an already trained target (--continue-target)


FULL = BuildPlan(
    target=TrainConfig(steps=2500, lr=1e-3, warmup=60, vision_steps=400, eval_every=250),
    draft=TrainConfig(steps=450, lr=3e-3, warmup=40, vision_steps=100, eval_every=50, seed=1),
    target_continued=TrainConfig(steps=1500, lr=5e-4, warmup=50, probe_steps=100, eval_every=250, seed=2),
)
QUICK = BuildPlan(
    target=TrainConfig(steps=2, images_per_step=2, warmup=1, vision_steps=1, vision_images_per_step=2,
                       eval_every=2, validation_images=2),
    draft=TrainConfig(steps=2, images_per_step=2, warmup=1, vision_steps=1, vision_images_per_step=2,
                      eval_every=2, validation_images=2, seed=1),
    target_continued=TrainConfig(steps=2, images_per_step=2, warmup=1, probe_steps=1, vision_images_per_step=2,
                                  eval_every=2, validation_images=2, seed=2),
)


def _run(role: str, model, config: TrainConfig, log, teacher=None) -> list[dict]:
    rows = []
    total = config.vision_steps + config.probe_steps + config.steps
    with tqdm(total=total, desc=f"train {role}", unit="step") as progress:
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
          continue_target: bool = False, threads: int = 1) -> Path:
    """Train the target (or reuse the one in ``target_dir``, optionally training it further),
    distill the draft from it, and save both with the learning curve.

    With ``target_dir``, the target's rows of ``target_dir/../learning_curve.json`` (when
    present) open the new curve."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log({"plan": asdict(plan)})
    rows = []
    if target_dir is None:
        target = new_model("target", seed=plan.target.seed)
        rows += _run("target", target, plan.target, log)
    else:
        from transformers import LlavaForConditionalGeneration

        target_dir = Path(target_dir)
        previous = target_dir.parent / "learning_curve.json"
        if previous.is_file():
            rows += [row for row in json.loads(previous.read_text()) if row["model"] != "draft"]
        target = LlavaForConditionalGeneration.from_pretrained(target_dir)
        if continue_target:
            rows += _run("target (continued)", target, plan.target_continued, log)
    save_toy_model(target, out / "target")
    draft = new_model("draft", seed=plan.draft.seed)
    rows += _run("draft", draft, plan.draft, log, teacher=target)
    save_toy_model(draft, out / "draft")
    write_curve(rows, out)
    return out
