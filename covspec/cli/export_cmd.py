"""`covspec export`: a local draft VLM folder -> a verified device artifact folder.

Heavy imports (torch, transformers, onnx) happen inside the command, so loading the
CLI stays cheap.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def _with_supported(command):
    """Name the registered families' model classes in the command's help (the registry
    imports no torch)."""
    from covspec.families import FAMILIES

    lines = [f"  {', '.join(family.architectures)} (family {name})" for name, family in FAMILIES.items()]
    command.help = command.help.replace("    {supported}", "\n".join(f"    {line}" for line in lines))
    return command


def _summary(manifest: dict, folder: Path, seconds: float) -> str:
    lines = [f"Artifact {folder} ({manifest['quantization']['scheme']}, {manifest['graph_format']}, "
             f"opset {manifest['opset']}, {manifest['num_visual_tokens']} visual tokens) in {seconds:.1f} s", ""]
    width = max(len(name) for name in manifest["files"])
    lines.append(f"  {'file':<{width}}  {'size':>10}  sha256")
    for name, entry in manifest["files"].items():
        lines.append(f"  {name:<{width}}  {_human(entry['bytes']):>10}  {entry['sha256'][:12]}")
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    lines.append(f"  {'total':<{width}}  {_human(total):>10}")
    lines += ["", "  parity"]
    fp32 = manifest["parity"]["fp32"]
    lines.append(f"  fp32   max |logits diff| {fp32['max_abs_diff_logits']:.2e} (bound {fp32['bound']:g}); "
                 f"greedy {fp32['greedy_match_tokens']}/{fp32['greedy_tokens']} tokens equal to PyTorch")
    for scheme in ("int8", "int4"):
        if scheme in manifest["parity"]:
            entry = manifest["parity"][scheme]
            candidates = ", ".join(f"{k} {v:.1%}" for k, v in entry["candidates"].items())
            lines.append(f"  {scheme}   top-1 agreement {entry['top1_agreement']:.1%} over {entry['positions']} "
                         f"positions (bound {entry['bound']:.0%}); kept {entry['variant']} "
                         f"[{candidates}]; quantized graphs: {', '.join(manifest['quantization']['graphs'])}")
    return "\n".join(lines)


def _image_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    """``N`` or ``WxH`` -> (width, height)."""
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise click.BadParameter(f"{value!r} is not N or WxH (positive pixel counts), e.g. 448 or 448x336.")
    return (int(parts[0]), int(parts[-1]))


@_with_supported
@click.command(name="export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Artifact folder to write, e.g. artifacts/toy-draft-int8.")
@click.option("--quant", type=click.Choice(["fp32", "int8", "int4"]), default="fp32", show_default=True,
              help="Weight quantization of the decoder (and the vision graph where it keeps agreement).")
@click.option("--format", "graph_format", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="'ort' also converts the graphs to onnxruntime's mobile ORT format.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset version.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript",
              show_default=True, help="torch.onnx exporter (both pass the same parity checks).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="Minimum top-1 agreement with fp32 for int8/int4 [default: 0.90 int8, 0.75 int4].")
@click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Default share of visual tokens the draft keeps, written into the manifest "
                   "[default: 0.5, chosen by `covspec bench pruning`; `device run --keep-ratio` overrides].")
@click.option("--image-size", callback=_image_size, default=None, metavar="N|WxH",
              help="Pixel size of the draft's vision graph for a dynamic-resolution family (Qwen2-VL): N for "
                   "N x N, or WxH; the device resizes every image to it [default: 448 x 448 as the model's "
                   "processor rounds it].")
@click.option("--force", is_flag=True, help="Replace the output folder if it holds an earlier artifact.")
def export(model_dir: Path, out: Path, quant: str, graph_format: str, opset: int, exporter: str,
           min_agreement: float | None, keep_ratio: float | None, image_size: tuple[int, int] | None,
           force: bool) -> None:
    """Export the draft VLM in MODEL_DIR (a local transformers folder) to ONNX artifacts.

    Writes vision.onnx, scorer.onnx, decoder.onnx, embed_tokens.npy, tokenizer.json and
    manifest.json (hashes, preprocessing, parity report). Every export checks parity
    against PyTorch and fails if the graphs disagree; a model that speaks the toy
    vocabulary is checked on ShapesVQA scenes. Nothing is downloaded.

    \b
    Supported model classes (config.json "architectures"):
    {supported}
    """
    from covspec.export.errors import ExportError
    from covspec.export.pipeline import DEFAULT_KEEP_RATIO, ExportOptions, export_model, stages
    from covspec.families import ImageSizeError, ModelFolderError
    from covspec.toy.artifacts import parity_prompts, speaks_toy_vocabulary

    options = ExportOptions(quant=quant, graph_format=graph_format, opset=opset, force=force,
                            exporter=exporter, min_agreement=min_agreement,
                            keep_ratio=DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio,
                            image_size=image_size)
    names = stages(options)
    started = time.monotonic()

    def progress(stage: str) -> None:
        click.echo(f"[{names.index(stage) + 1}/{len(names)}] {time.monotonic() - started:6.1f} s  {stage}", err=True)

    try:
        prompts = parity_prompts() if speaks_toy_vocabulary(model_dir) else None
        result = export_model(model_dir, out, options, progress=progress, prompts=prompts)
    except ImageSizeError as exc:
        raise click.BadParameter(str(exc), param_hint="--image-size") from exc
    except ModelFolderError as exc:
        raise click.BadParameter(str(exc), param_hint="MODEL_DIR") from exc
    except ExportError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    click.echo(_summary(result.manifest, result.folder, time.monotonic() - started))
