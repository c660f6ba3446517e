"""`covspec export` end to end: model folder -> verified artifact folder.

Stages (each reported to ``progress``): load the model, export the fp32 graphs,
write the embedding table and tokenizer, check fp32 parity (logits and greedy
tokens), quantize (int8: per-channel and per-tensor measured, the better kept;
int4: MatMulNBits; the vision graph is quantized too only if that does not lower
top-1 agreement), convert to ORT format on request, and write ``manifest.json``
(validated by reading it back). Everything is built in ``<out>.partial`` and renamed
into place at the end, so a failed export leaves no half artifact behind.
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

import numpy as np

from covspec.export.errors import ExportError, OutputExistsError, ParityError
from covspec.export.quantize import SCHEMES

# Minimum top-1 agreement with fp32 per scheme (the int8 bound is the 90%).
DEFAULT_MIN_AGREEMENT = {"int8": 0.90, "int4": 0.75}
GRAPH_FORMATS = ("onnx", "ort")
EXPORTERS = ("torchscript", "dynamo")
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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


def _size(value, default) -> list[int]:
    if value is None:
        return list(default)
    get = value.get if isinstance(value, dict) else lambda key: getattr(value, key, None)
    return [get("height"), get("width")] if get("height") is not None else list(default)


def image_section(processor, image_size: int) -> dict:
    ip = processor.image_processor
    size = ip.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    resample = getattr(ip, "resample", 3)
    return {
        "size": [image_size, image_size],
        "resize_shortest_edge": shortest if shortest is not None else image_size,
        "crop_size": _size(getattr(ip, "crop_size", None), (image_size, image_size)),
        "do_center_crop": bool(getattr(ip, "do_center_crop", False)),
        "rescale_factor": float(getattr(ip, "rescale_factor", 1 / 255)),
        "mean": [float(x) for x in ip.image_mean],
        "std": [float(x) for x in ip.image_std],
        "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
        "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
    }


def tokenizer_section(model, processor, tokenizer_file: Path) -> dict:
    from tokenizers import Tokenizer

    from covspec.protocol.vocab import vocab_hash

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
    return {"file": "tokenizer.json", "vocab_size": len(vocab), "vocab_hash": vocab_hash(vocab),
            "bos_id": tok.bos_token_id, "eos_ids": [int(i) for i in eos_ids], "pad_id": tok.pad_token_id,
            "image_token_id": int(model.config.image_token_id)}


def _runner(folder: Path, adapter, tokenizer: dict, vision="vision.onnx", decoder="decoder.onnx"):
    from covspec.export.adapters import past_names
    from covspec.export.onnx_run import OnnxVLM

    spec = adapter.decoder_spec
    return OnnxVLM(folder / vision, folder / decoder, np.load(folder / "embed_tokens.npy"),
                   tokenizer["image_token_id"], tokenizer["eos_ids"], past_names(spec.num_layers),
                   spec.num_kv_heads, spec.head_dim)


def _quantize_stage(folder: Path, scheme: str, adapter, tokenizer: dict, samples, bound: float) -> tuple[dict, dict]:
    """Quantize the decoder (int8: per-channel and per-tensor, ties keep per-channel), then
    the vision graph too if that does not lower agreement; returns (quantization, parity)."""
    from covspec.export.parity import agreement_references, top1_agreement
    from covspec.export.quantize import quantize

    reference = agreement_references(_runner(folder, adapter, tokenizer), samples)
    variants = [True, False] if scheme == "int8" else [True]
    measured, best = {}, None
    for per_channel in variants:
        tag = f"{scheme}{'' if scheme == 'int4' else ('_per_channel' if per_channel else '_per_tensor')}"
        details = quantize(scheme, folder / "decoder.onnx", folder / f"decoder.{tag}.onnx", per_channel)
        result = top1_agreement(_runner(folder, adapter, tokenizer, decoder=f"decoder.{tag}.onnx"), reference)
        measured[tag] = result
        if best is None or result["top1_agreement"] > measured[best[0]]["top1_agreement"]:
            best = (tag, details)
    tag, details = best
    quantize(scheme, folder / "vision.onnx", folder / "vision.quant.onnx", details.get("per_channel", True))
    with_vision = top1_agreement(_runner(folder, adapter, tokenizer, vision="vision.quant.onnx",
                                         decoder=f"decoder.{tag}.onnx"), reference)
    vision_quantized = with_vision["top1_agreement"] >= measured[tag]["top1_agreement"]
    final = with_vision if vision_quantized else measured[tag]
    if vision_quantized:
        (folder / "vision.quant.onnx").replace(folder / "vision.onnx")
    (folder / f"decoder.{tag}.onnx").replace(folder / "decoder.onnx")
    for leftover in folder.glob("*.onnx"):
        if leftover.name not in ("vision.onnx", "decoder.onnx", "scorer.onnx"):
            leftover.unlink()
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
                 progress: Callable[[str], None] = lambda stage: None, samples=None) -> ExportResult:
    """Export ``model_dir`` into the artifact folder ``out``; see the module docstring.

    ``samples`` (a list of ``parity.Sample``) overrides the parity inputs.
    """
    from covspec.hf.folder import read_config
    from covspec.protocol.manifest import Manifest, describe_files, load_manifest, write_manifest

    options = options or ExportOptions()
    if (options.quant not in SCHEMES or options.graph_format not in GRAPH_FORMATS
            or options.exporter not in EXPORTERS):
        raise ValueError(f"quant must be one of {SCHEMES}, format one of {GRAPH_FORMATS} and exporter "
                         f"one of {EXPORTERS}.")
    model_dir, out = Path(model_dir), Path(out)
    config = read_config(model_dir)
    if out.exists() and not options.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it.")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file())):
        raise OutputExistsError(f"{out} exists and is not an artifact folder (no manifest.json); "
                                "--force only replaces artifact folders. Choose another --out.")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _build(model_dir, partial, config, options, progress, samples)
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


def _build(model_dir: Path, folder: Path, config: dict, options: ExportOptions, progress, samples) -> dict:
    import torch

    from covspec import __version__
    from covspec.export import graphs, parity
    from covspec.export.adapters import adapter_for
    from covspec.hf.folder import load_llava, prompt_template

    progress("load model")
    model, processor = load_llava(model_dir)
    adapter = adapter_for(model)
    template = prompt_template(processor)

    progress("export graphs")
    graph_specs = {
        "vision": graphs.export_vision(adapter, folder, options.opset, options.exporter),
        "scorer": graphs.export_scorer(adapter.decoder_spec.hidden_size, folder, options.opset, options.exporter),
        "decoder": graphs.export_decoder(adapter, folder, options.opset, options.exporter),
    }

    progress("embeddings + tokenizer")
    table = adapter.embed_tokens.numpy().astype(np.float32)
    np.save(folder / "embed_tokens.npy", table, allow_pickle=False)
    shutil.copyfile(model_dir / "tokenizer.json", folder / "tokenizer.json")
    tokenizer = tokenizer_section(model, processor, folder / "tokenizer.json")

    progress("fp32 parity")
    samples = (samples or parity.toy_samples(processor, template, tokenizer["vocab_hash"])
               or [parity.sample_input(processor, template)])
    sample = samples[0]
    runner = _runner(folder, adapter, tokenizer)
    report = {"fp32": parity.check_fp32(model, adapter, runner, folder / "scorer.onnx", sample)}
    num_visual_tokens = int(runner.encode_image(sample.pixel_values)[0].shape[1])
    del runner

    quantization = {"scheme": "fp32", "graphs": []}
    if options.quant != "fp32":
        progress("quantize")
        bound = options.min_agreement if options.min_agreement is not None else DEFAULT_MIN_AGREEMENT[options.quant]
        quantization, report[options.quant] = _quantize_stage(folder, options.quant, adapter, tokenizer, samples,
                                                              bound)
    if options.graph_format == "ort":
        progress("convert to ORT")
        _convert_to_ort(folder, graph_specs)

    text, vision = model.config.text_config, model.config.vision_config
    return {
        "format": "covspec-artifact", "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "covspec_version": __version__,
        "source": {"path": str(model_dir.resolve()), "sha256": source_hash(model_dir),
                   "architecture": config["architectures"][0], "text_model_type": text.model_type,
                   "vision_model_type": vision.model_type, "torch_version": torch.__version__,
                   "exporter": options.exporter},
        "quantization": quantization, "opset": options.opset, "graph_format": options.graph_format,
        "files": {}, "graphs": graph_specs, "decoder": adapter.decoder_spec.to_dict(),
        "embedding": {"file": "embed_tokens.npy", "dtype": "float32", "shape": list(table.shape)},
        "tokenizer": tokenizer, "image": image_section(processor, vision.image_size),
        "num_visual_tokens": num_visual_tokens, "prompt_template": template,
        "pruning": {"keep_ratio": options.keep_ratio, "selection": "covspec"}, "parity": report,
    }
