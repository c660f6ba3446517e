"""`covspec export` end to end: model folder -> verified artifact folder.

Family-agnostic: the model folder's family (``covspec.families``) loads the model
and supplies its graphs and manifest sections; the manifest records the family's
name. Stages (each reported to ``progress``): load the model, export the fp32
graphs, write the embedding table and tokenizer, check fp32 parity (logits and
greedy tokens, run through the device's own drafter), quantize (int8: per-channel and per-tensor measured, the better kept;
int4: MatMulNBits; the vision graph is quantized too only if that does not lower
top-1 agreement; the token table is stored in the quantization's precision, and the
quantized candidates are measured on it), convert to ORT format on request, and write
``manifest.json`` (validated by reading it back). Everything is built in
``<out>.partial`` and renamed into place at the end, so a failed export leaves no half
artifact behind. A graph past 2 GiB keeps its weights in external data
(``onnx_files``), listed and hashed in the manifest like every file; the manifest's
``decoder.kv_cache`` says whether the decoder's cache can be one shared buffer.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covspec.export import onnx_files
from covspec.export.embedding import write_table
from covspec.export.errors import ExportError, OutputExistsError, ParityError
from covspec.export.quantize import SCHEMES

from covspec.families import Family, family_for_folder
from covspec.families.chat import chat_turns

if TYPE_CHECKING:  # torch-side types; this module imports torch only when it exports
    from covspec.export.parity import ExportedDraft, ParityPrompt, Sample

# Minimum top-1 agreement with fp32 per scheme (the int8 bound is the 90%).
DEFAULT_MIN_AGREEMENT = {"int8": 0.90, "int4": 0.75}
GRAPH_FORMATS = ("onnx", "ort")
EXPORTERS = ("torchscript", "dynamo")
EMBEDDINGS = ("artifact", "float32")
VISION_QUANTIZATION = ("auto", "always", "never")


# The draft's default share of visual tokens, written into the manifest; chosen from
# `covspec bench pruning` (BENCHMARKS.md, "Visual token reduction": with the third toy
# pair, 50% kept keeps all of the acceptance and is fastest; 25% keeps 84%). It never
# changes the output, only the draft's prefill time and acceptance.
DEFAULT_KEEP_RATIO = 0.5


@dataclass
class ExportOptions:
    quant: str = "fp32"
    graph_format: str = "onnx"
    opset: int = 18
    force: bool = False
    exporter: str = "torchscript"
    min_agreement: float | None = None  # None: DEFAULT_MIN_AGREEMENT[quant]
    keep_ratio: float = DEFAULT_KEEP_RATIO
    image_size: tuple[int, int] | None = None  # (width, height) of a dynamic-resolution family's vision graph
    embedding: str = "artifact"   # the token table's precision: "artifact" (the quantization's) or "float32"
    quantize_vision: str = "auto"  # "auto": only if top-1 agreement does not drop; "always"; "never"


@dataclass
class ExportResult:
    folder: Path
    manifest: dict


def stages(options: ExportOptions) -> list[str]:
    """The stage names ``export_model`` reports, in order, for ``options``."""
    names = ["load model", "export graphs", "embeddings + tokenizer", "fp32 parity"]
    names += ["quantize"] if options.quant != "fp32" else []
    names += ["convert to ORT"] if options.graph_format == "ort" else []
    return names + ["manifest"]


def source_hash(model_dir: Path) -> str:
    """sha256 over config.json and the weight files (sorted by name), streamed."""
    digest = hashlib.sha256()
    files = [model_dir / "config.json"] + sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _quantize_stage(folder: Path, scheme: str, reference: Callable[..., ExportedDraft],
                    runner: Callable[..., ExportedDraft], samples: list[Sample], bound: float,
                    vision: str = "auto") -> tuple[dict, dict]:
    """Quantize the decoder (int8: each of ``INT8_VARIANTS``, ties keep the first), then
    the vision graph too if that does not lower agreement; returns (quantization, parity)."""
    from covspec.export.parity import agreement_references, top1_agreement
    from covspec.export.quantize import INT8_VARIANTS, quantize

    reference = agreement_references(reference(), samples)
    variants = INT8_VARIANTS if scheme == "int8" else (None,)
    measured, best = {}, None
    for variant in variants:
        tag = scheme if variant is None else f"{scheme}_{variant}"
        details = quantize(scheme, folder / "decoder.onnx", folder / f"decoder.{tag}.onnx", variant)
        result = top1_agreement(runner(decoder=f"decoder.{tag}.onnx"), reference)
        measured[tag] = result
        if best is None or result["top1_agreement"] > measured[best[0]]["top1_agreement"]:
            best = (tag, details)
    tag, details = best
    with_vision = {"top1_agreement": None}
    if vision != "never":
        quantize(scheme, folder / "vision.onnx", folder / "vision.quant.onnx", details.get("variant"))
        with_vision = top1_agreement(runner(vision="vision.quant.onnx", decoder=f"decoder.{tag}.onnx"), reference)
    vision_quantized = vision == "always" or (
        vision == "auto" and with_vision["top1_agreement"] >= measured[tag]["top1_agreement"])
    final = with_vision if vision_quantized else measured[tag]
    if vision_quantized:
        onnx_files.replace(folder / "vision.quant.onnx", folder / "vision.onnx")
    onnx_files.replace(folder / f"decoder.{tag}.onnx", folder / "decoder.onnx")
    for leftover in folder.glob("*.onnx"):
        if leftover.name not in ("vision.onnx", "decoder.onnx", "scorer.onnx"):
            onnx_files.remove(leftover)
    parity = {**final, "bound": bound, "variant": tag,
              "candidates": {name: r["top1_agreement"] for name, r in measured.items()},
              "vision_quantized_top1_agreement": with_vision["top1_agreement"]}
    if not final["top1_agreement"] >= bound:
        raise ParityError(f"{scheme} keeps only {final['top1_agreement']:.1%} top-1 agreement with fp32 over "
                          f"{final['positions']} positions (bound {bound:.0%}).")
    quantization = {"scheme": scheme, **details, "graphs": ["decoder"] + (["vision"] if vision_quantized else []),
                    "selected_by": "top-1 agreement with fp32 on the parity samples"}
    return quantization, parity


def _convert_to_ort(folder: Path, graphs: dict) -> None:
    """onnxruntime's own converter; adds ``ort_file`` to each graph entry."""
    big = [spec["file"] for spec in graphs.values() if onnx_files.uses_external(folder / spec["file"])]
    if big:
        raise ExportError(f"--format ort holds a graph in one file of at most 2 GiB; {', '.join(big)} keeps its "
                          "weights in external data. Export with --format onnx, or quantize.")
    command = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(folder),
               "--output_dir", str(folder), "--optimization_style", "Fixed"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"ORT conversion failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    for leftover in folder.glob("*.config"):
        leftover.unlink()  # required-operator lists for custom builds; not part of the artifact
    for spec in graphs.values():
        ort_file = Path(spec["file"]).with_suffix(".ort").name
        if not (folder / ort_file).is_file():
            raise ExportError(f"ORT conversion produced no {ort_file}.")
        spec["ort_file"] = ort_file


def export_model(model_dir: str | Path, out: str | Path, options: ExportOptions | None = None,
                 progress: Callable[[str], None] = lambda stage: None,
                 prompts: list[ParityPrompt] | None = None) -> ExportResult:
    """Export ``model_dir`` into the artifact folder ``out``; see the module docstring.

    ``prompts`` are the parity inputs (default: ``parity.default_prompt``).
    """
    from covspec.protocol.manifest import Manifest, describe_files, load_manifest, write_manifest

    options = options or ExportOptions()
    if (options.quant not in SCHEMES or options.graph_format not in GRAPH_FORMATS
            or options.exporter not in EXPORTERS or options.embedding not in EMBEDDINGS
            or options.quantize_vision not in VISION_QUANTIZATION):
        raise ValueError(f"quant must be one of {SCHEMES}, format one of {GRAPH_FORMATS}, exporter "
                         f"one of {EXPORTERS}, embedding one of {EMBEDDINGS} and quantize_vision one of "
                         f"{VISION_QUANTIZATION}.")
    model_dir, out = Path(model_dir), Path(out)
    family = family_for_folder(model_dir)
    if options.image_size is not None and not family.dynamic_resolution:
        raise ExportError(f"--image-size applies to dynamic-resolution families; {family.name} models have a fixed "
                          "vision input size.")
    if out.exists() and not options.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it.")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file())):
        raise OutputExistsError(f"{out} exists and is not an artifact folder (no manifest.json); "
                                "--force only replaces artifact folders. Choose another --out.")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _build(model_dir, partial, family, options, progress, prompts)
        progress("manifest")
        manifest["files"] = describe_files(partial)
        write_manifest(partial, Manifest.from_dict(manifest))
        load_manifest(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ExportResult(out, json.loads((out / "manifest.json").read_text()))


def _build(model_dir: Path, folder: Path, family: Family, options: ExportOptions, progress,
           prompts: list[ParityPrompt] | None) -> dict:
    import torch
    from tokenizers import Tokenizer

    from covspec import __version__
    from covspec.export import graphs, parity
    from covspec.export.parity import ExportedDraft
    from covspec.protocol.manifest import FORMAT_VERSION

    progress("load model")
    model, processor = family.load(model_dir)
    sized = {"image_size": options.image_size} if options.image_size is not None else {}
    half = family.exporter(model, processor, **sized)
    turns = chat_turns(processor)        # None: the template renders no conversation, one question per session

    progress("export graphs")
    graph_specs = {
        "vision": graphs.export_graph(half.vision_graph(), folder / "vision.onnx", options.opset, options.exporter),
        "scorer": graphs.export_scorer(half.decoder_spec.hidden_size, folder, options.opset, options.exporter),
        "decoder": graphs.export_graph(half.decoder_graph(), folder / "decoder.onnx", options.opset,
                                       options.exporter),
    }

    decoder_section = {**half.decoder_spec.to_dict(),
                       "kv_cache": graphs.kv_cache_layout(folder / "decoder.onnx",
                                                          half.decoder_spec.to_dict()["past_input_names"])}

    progress("embeddings + tokenizer")
    table = half.embed_tokens()
    embedding, _ = write_table(table, folder, "float32")
    shutil.copyfile(model_dir / "tokenizer.json", folder / "tokenizer.json")
    tokenizer = half.tokenizer_section(folder / "tokenizer.json")
    image = half.image_section()

    progress("fp32 parity")
    device_half = family.device(image=image, tokenizer_section=tokenizer, prompt_template=half.template,
                                tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")), embed_tokens=table)

    def runner(vision: str = "vision.onnx", decoder: str = "decoder.onnx", half=device_half,
               lookup: np.ndarray = table) -> ExportedDraft:
        return ExportedDraft(folder / vision, folder / decoder, decoder_section, half, lookup, tokenizer["eos_ids"])

    samples = [parity.sample_input(half, prompt) for prompt in (prompts or [parity.default_prompt(half)])]
    fp32 = runner()
    report = {"fp32": parity.check_fp32(model, half, fp32, folder / "scorer.onnx", samples[0])}
    num_visual_tokens = int(fp32.visual_tokens(samples[0])[0].shape[0])   # of the first sample's image
    del fp32

    quantization = {"scheme": "fp32", "graphs": []}
    if options.quant != "fp32":
        progress("quantize")
        bound = options.min_agreement if options.min_agreement is not None else DEFAULT_MIN_AGREEMENT[options.quant]
        # The candidates run as the device will: on the table in the artifact's precision.
        precision = options.quant if options.embedding == "artifact" else "float32"
        embedding, stored = write_table(table, folder, precision)
        stored_half = family.device(image=image, tokenizer_section=tokenizer, prompt_template=half.template,
                                    tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")), embed_tokens=stored)
        quantization, report[options.quant] = _quantize_stage(
            folder, options.quant, runner, lambda **names: runner(**names, half=stored_half, lookup=stored), samples,
            bound, options.quantize_vision)
    if options.graph_format == "ort":
        progress("convert to ORT")
        _convert_to_ort(folder, graph_specs)

    return {
        "format": "covspec-artifact", "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "covspec_version": __version__,
        "source": {"path": str(model_dir.resolve()), "sha256": source_hash(model_dir), "family": family.name,
                   **half.source_section(), "torch_version": torch.__version__, "exporter": options.exporter},
        "quantization": quantization, "opset": options.opset, "graph_format": options.graph_format,
        "files": {}, "graphs": graph_specs, "decoder": decoder_section,
        "embedding": embedding,
        "tokenizer": tokenizer, "image": image,
        "num_visual_tokens": num_visual_tokens, "prompt_template": half.template,
        "conversation": None if turns is None else turns.to_dict(),
        "pruning": {"keep_ratio": options.keep_ratio, "selection": "covspec"}, "parity": report,
    }
