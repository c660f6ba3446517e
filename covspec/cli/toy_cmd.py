"""``covspec toy``: build (train) and evaluate the ShapesVQA toy models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from covspec.toy.models import ROLES, bundled_model_dir


def _model_dir(model: str) -> Path:
    return bundled_model_dir(model) if model in ROLES else Path(model)


@click.group()
def toy() -> None:
    """The ShapesVQA toy world: build and evaluate toy models."""


@toy.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the package's bundled models folder).")
@click.option("--quick", is_flag=True, help="Train a few steps only (seconds), to prove the pipeline.")
@click.option("--target-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Reuse a trained target folder; only distill the draft.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also append the loss log (JSON lines) to this file.")
def build(out: Path | None, quick: bool, target_from: Path | None, log_file: Path | None) -> None:
    """Train the target, distill the draft, save both with the learning curve."""
    from covspec.toy.build import FULL, QUICK, build as run_build

    out = out or bundled_model_dir("target").parent

    def log(row: dict) -> None:
        line = json.dumps(row)
        click.echo(line)
        if log_file is not None:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    run_build(out, QUICK if quick else FULL, log=log, target_dir=target_from)
    click.echo(f"saved target and draft under {out}")


@toy.command("eval")
@click.option("--model", default="target", show_default=True,
              help="'target', 'draft' (the bundled models) or a model folder.")
@click.option("--n", "n_scenes", default=250, show_default=True,
              help="Number of held-out test scenes (each gives up to 7 questions).")
@click.option("--agreement/--no-agreement", default=True, show_default=True,
              help="Also measure draft/target top-1 agreement on descriptions.")
@click.option("--target", "target_model", default="target", show_default=True,
              help="Target for the agreement measurement.")
@click.option("--draft", "draft_model", default="draft", show_default=True,
              help="Draft for the agreement measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate(model: str, n_scenes: int, agreement: bool, target_model: str, draft_model: str,
             as_json: bool) -> None:
    """Per-question-type exact match, description F1, and draft/target agreement."""
    import torch

    from covspec.hf.folder import ModelFolderError, load_llava
    from covspec.toy import shapes
    from covspec.toy.evaluate import accuracy_report, draft_agreement

    torch.set_num_threads(2)
    if n_scenes < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    try:
        subject, processor = load_llava(_model_dir(model))
    except ModelFolderError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from exc
    questions = shapes.held_out_questions(n_scenes)
    result = {"model": model, "questions": len(questions),
              "accuracy": accuracy_report(subject, processor, questions)}
    if agreement:
        target, _ = load_llava(_model_dir(target_model))
        draft, _ = load_llava(_model_dir(draft_model))
        described = [s for s in (shapes.sample("test", i) for i in range(min(n_scenes, 100)))
                     if any(qa.type == "describe" for qa in s.qas)]
        result["agreement"] = draft_agreement(target, draft, processor, described)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"model {model}: {len(questions)} held-out questions")
    click.echo(f"{'type':<12} {'n':>5} {'exact':>7}")
    for qtype, row in result["accuracy"].items():
        extra = f"  per-shape F1 {row['f1']:.3f}" if "f1" in row else ""
        click.echo(f"{qtype:<12} {row['n']:>5} {row['exact_match']:>7.1%}{extra}")
    if agreement:
        click.echo(f"draft/target top-1 agreement (descriptions, teacher-forced): {result['agreement']:.1%}")
