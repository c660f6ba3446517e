"""``covspec toy``: build (train) and evaluate the ShapesVQA toy models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from covspec.toy.models import ROLES, bundled_model_dir


def _model_dir(model: str) -> Path:
    return bundled_model_dir(model) if model in ROLES else Path(model)


def _load(model: str):
    """(model, processor) of a bundled role or a model folder, through its family."""
    from covspec.families import family_for_folder

    folder = _model_dir(model)
    return family_for_folder(folder).load(folder)


@click.group()
def toy() -> None:
    """The ShapesVQA toy world: build and evaluate toy models."""


@toy.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the package's bundled models folder).")
@click.option("--quick", is_flag=True, help="Train a few steps only (seconds), to prove the pipeline.")
@click.option("--target-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Reuse a trained target folder; only distill the draft.")
@click.option("--continue-target", is_flag=True,
              help="With --target-from: train that target further before distilling.")
@click.option("--target-steps", type=click.IntRange(min=1), default=None, help="Override the target's step count.")
@click.option("--draft-steps", type=click.IntRange(min=1), default=None, help="Override the draft's step count.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Torch threads (1 is fastest when other processes share the cores).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also append the loss log (JSON lines) to this file.")
def build(out: Path | None, quick: bool, target_from: Path | None, continue_target: bool, target_steps: int | None,
          draft_steps: int | None, threads: int, log_file: Path | None) -> None:
    """Train the target, distill the draft, save both with the learning curve."""
    from dataclasses import replace

    from covspec.toy.build import FULL, QUICK, build as run_build

    if continue_target and target_from is None:
        raise click.UsageError("--continue-target needs --target-from DIR.")
    out = out or bundled_model_dir("target").parent

    def log(row: dict) -> None:
        line = json.dumps(row)
        click.echo(line)
        if log_file is not None:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    plan = QUICK if quick else FULL
    if target_steps is not None:
        plan = replace(plan, target=replace(plan.target, steps=target_steps),
                       target_continued=replace(plan.target_continued, steps=target_steps))
    if draft_steps is not None:
        plan = replace(plan, draft=replace(plan.draft, steps=draft_steps))
    run_build(out, plan, log=log, target_dir=target_from, continue_target=continue_target, threads=threads)
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
@click.option("--timing/--no-timing", default=True, show_default=True,
              help="Also time greedy decode per token (eager, KV cache) of target and draft.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate(model: str, n_scenes: int, agreement: bool, target_model: str, draft_model: str,
             timing: bool, as_json: bool) -> None:
    """Per-question-type exact match, description F1, and draft/target agreement."""
    import torch

    from covspec.families import ModelFolderError
    from covspec.toy import shapes
    from covspec.toy.evaluate import accuracy_report, decode_ms_per_token, draft_agreement, parameter_count

    torch.set_num_threads(2)
    if n_scenes < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    try:
        subject, processor = _load(model)
    except ModelFolderError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from exc
    questions = shapes.held_out_questions(n_scenes)
    result = {"model": model, "questions": len(questions),
              "accuracy": accuracy_report(subject, processor, questions)}
    if agreement or timing:
        target, _ = _load(target_model)
        draft, _ = _load(draft_model)
    if agreement:
        described = [s for s in (shapes.sample("test", i) for i in range(min(n_scenes, 100)))
                     if any(qa.type == "describe" for qa in s.qas)]
        result["agreement"] = draft_agreement(target, draft, processor, described)
    if timing:
        probe = shapes.sample("test", 0)
        result["timing"] = {role: {"params": parameter_count(m), **decode_ms_per_token(m, processor, probe)}
                            for role, m in (("target", target), ("draft", draft))}
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
    for role, row in result.get("timing", {}).items():
        click.echo(f"{role}: {row['params'] / 1e6:.2f}M params, decode {row['decode_ms']:.2f} ms/token, "
                   f"prefill {row['prefill_ms']:.1f} ms (eager, KV cache, median)")
