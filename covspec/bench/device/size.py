"""`covspec bench device --config NAME`: the draft on the device at real size.

A config names the dimensions of a real draft VLM. The bench builds a random-weight model
of those dimensions (no weights needed: ``build_model``), exports it with ``covspec
export`` in each precision (fp32, int8, int4; parity reported, agreement not enforced:
random weights), then measures every artifact in a process of its own
(``probe``: load, peak RSS, vision, the LM prefill per keep ratio, per-token
decode per context length, with the shared-buffer cache and the copying one) with one
onnxruntime thread and with all, and in the same run its anchors (``anchor``:
the same text decoder under onnxruntime-genai, and the bandwidth floor), then ``covspec
device run`` itself, lean and resident, against the model served as its own target
(``run``: the peak RSS the issue's goal is about). ``goals`` turns the figures into
the issue's goals, met or not, with the numbers; ``markdown`` renders them.

Output: ``<out>/<config>/device-size.json`` and ``device-size.md``. Torch and
transformers (to build and export); the probes are torch-free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

QUANTS = ("fp32", "int8", "int4")
CONTEXTS = (256, 1024, 2048)


@dataclass(frozen=True)
class SizeConfig:
    """A real draft's dimensions: a SigLIP(-like) tower and a Qwen2 or Llama language model,
    in a VLM family (``"llava"`` or ``"idefics3"``)."""

    name: str
    description: str
    vision: dict                   # SiglipVisionConfig fields
    language: str                  # "qwen2" or "llama"
    text: dict                     # the language model config's fields
    family: str = "llava"
    options: dict = field(default_factory=dict)    # the family builder's other arguments (see BUILDERS)
    notes: list[str] = field(default_factory=list)


SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
SIGLIP_BASE_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 512, "patch_size": 16}
QWEN2_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0, "tie_word_embeddings": True}
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "tie_word_embeddings": True}

CONFIGS = {config.name: config for config in (
    SizeConfig("llava-interleave-qwen-0.5b", "LLaVA-Interleave-Qwen-0.5B dimensions: SigLIP-so400m at 384 px "
               "(729 visual tokens), Qwen2 0.5B language model", SIGLIP_SO400M_384, "qwen2", QWEN2_05B),
    SizeConfig("llava-smollm2-135m", "the issue's baseline: a small SigLIP tower (224 px, 256 visual tokens) and "
               "SmolLM2-135M language model dimensions",
               {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6,
                "image_size": 224, "patch_size": 14}, "llama", SMOLLM2_135M),
    SizeConfig("smolvlm-256m", "SmolVLM-256M-Instruct dimensions: SigLIP-base-patch16 on 512 px tiles, pixel "
               "shuffle 4 (64 visual tokens a tile; images resized to a longest edge of 2048 px: up to 4 x 4 tiles "
               "+ the global image), SmolLM2-135M language model", SIGLIP_BASE_512, "llama", SMOLLM2_135M,
               family="idefics3", options={"scale_factor": 4, "longest_edge": 2048, "tile": 512, "smolvlm": True}),
)}


def build_model(config: SizeConfig, folder: Path, seed: int = 0) -> Path:
    """A seeded random-weight VLM of ``config``'s dimensions, saved with a word tokenizer of
    its vocabulary size and its processor, by its family's builder."""
    if config.family not in BUILDERS:
        raise ValueError(f"{config.name}: no builder for the {config.family!r} family; one of {sorted(BUILDERS)}.")
    return BUILDERS[config.family](config, Path(folder), seed)


def _build_llava(config: SizeConfig, folder: Path, seed: int) -> Path:
    """A LLaVA (SigLIP: square resize, "full" features)."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
    from transformers import SiglipVisionConfig

    from covspec.hf.folder import SPECIAL_TOKENS, build_word_tokenizer, save_llava_folder
    from covspec.hf.tiny import tiny_words

    tokenizer = build_word_tokenizer(tiny_words(config.text["vocab_size"]))
    text_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[config.language]
    text = text_class(**{**config.text, "vocab_size": tokenizer.get_vocab_size()}, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    vision = SiglipVisionConfig(**config.vision)
    tokens = (vision.image_size // vision.patch_size) ** 2
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
                        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                        image_seq_length=tokens, tie_word_embeddings=config.text.get("tie_word_embeddings", False))
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlavaForConditionalGeneration(llava).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return save_llava_folder(model, tokenizer, folder, image_size=vision.image_size, siglip=True, **config.options)


def _build_idefics3(config: SizeConfig, folder: Path, seed: int) -> Path:
    """An Idefics3 (a SmolVLM with ``options["smolvlm"]``): tiles of ``options["tile"]`` px
    from images resized to ``options["longest_edge"]``, pixel shuffle ``options["scale_factor"]``."""
    from covspec.hf.tiny_idefics3 import save_tiny_idefics3

    if config.language != "llama":
        raise ValueError(f"{config.name}: an Idefics3 language model is a Llama, not {config.language!r}.")
    return save_tiny_idefics3(folder, vocab_size=config.text["vocab_size"], seed=seed, vision=config.vision,
                              text=config.text, **config.options)


BUILDERS: dict[str, Callable[[SizeConfig, Path, int], Path]] = {"llava": _build_llava, "idefics3": _build_idefics3}


def _json_run(command: list[str], log: Callable[[str], None]) -> dict:
    """Run a probe process; its last stdout line is its JSON result."""
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"    failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:] }")
        return {"error": done.stderr.strip()[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - began
    return result


def run_bench(config_name: str, out: Path, *, quants=QUANTS, contexts=CONTEXTS, threads: tuple[int, ...] | None = None,
              genai: bool = True, device_runs: bool = True, decode_tokens: int = 16,
              log: Callable[[str], None] = print) -> dict:
    """Build, export, measure; returns (and writes) the report."""
    from covspec.export.pipeline import ExportOptions, export_model
    from covspec.protocol.manifest import ArtifactError, load_manifest

    if config_name not in CONFIGS:
        raise ValueError(f"unknown config {config_name!r}; choose one of {sorted(CONFIGS)}")
    config = CONFIGS[config_name]
    root = Path(out) / config.name
    root.mkdir(parents=True, exist_ok=True)
    threads = threads or tuple(sorted({1, os.cpu_count() or 1}))
    report = {"config": config.name, "description": config.description, "vision": config.vision,
              "language": config.language, "text": config.text, "contexts": list(contexts), "threads": list(threads),
              "machine": {"cpus": os.cpu_count()}, "artifacts": {}, "genai": {}}
    folder = root / "model"
    if not (folder / "config.json").is_file():
        log(f"building a random-weight {config.name} model ...")
        began = time.perf_counter()
        build_model(config, folder)
        report["build_s"] = time.perf_counter() - began
    for quant in quants:
        artifact = root / f"draft-{quant}"
        entry = report["artifacts"].setdefault(quant, {})
        try:
            manifest = load_manifest(artifact, verify_hashes=False)
            log(f"reusing {artifact}")
        except ArtifactError:
            log(f"exporting {quant} ...")
            began = time.perf_counter()
            # Random weights: agreement says nothing, so nothing is refused and the vision
            # graph is quantized with the decoder (as a real draft's would be when it keeps agreement).
            options = ExportOptions(quant=quant, force=True, min_agreement=0.0, quantize_vision="always")
            manifest = export_model(folder, artifact, options, progress=lambda stage: log(f"  export: {stage}")).manifest
            entry["export_s"] = time.perf_counter() - began
            manifest = load_manifest(artifact, verify_hashes=False)
        entry.update({"bytes": sum(f["bytes"] for f in manifest.files.values()),
                      "files": {name: f["bytes"] for name, f in manifest.files.items()},
                      "parity": manifest.parity.get(quant, manifest.parity.get("fp32")),
                      "decoder": manifest.decoder, "embedding": manifest.embedding,
                      "quantization": manifest.quantization})
        for count in threads:
            log(f"measuring {quant} with {count} thread(s) ...")
            command = [sys.executable, "-m", "covspec.bench.device.probe", str(artifact), "--threads", str(count),
                       "--contexts", ",".join(str(c) for c in contexts), "--decode-tokens", str(decode_tokens)]
            entry[f"threads_{count}"] = _json_run(command + ([] if count == 1 else ["--no-copying"]), log)
        if device_runs:
            from covspec.bench.device.run import device_run

            entry["device_run"] = device_run(folder, artifact, root / f"device-run-{quant}", log=log)
    if genai:
        _genai_anchor(folder, root, quants, contexts, threads, decode_tokens, report, log)
    report["goals"] = goals(report)
    (root / "device-size.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "device-size.md").write_text(markdown(report))
    return report


def _genai_anchor(folder: Path, root: Path, quants, contexts, threads, decode_tokens, report: dict, log) -> None:
    from covspec.bench.device.anchor import build_genai, language_model_folder

    lm = root / "language-model"
    if not (lm / "config.json").is_file():
        language_model_folder(folder, lm)
    for quant in quants:
        log(f"onnxruntime-genai {quant} ...")
        target = root / f"genai-{quant}"
        entry = build_genai(lm, target, quant) if not (target / "genai_config.json").is_file() else \
            {"folder": str(target), "bytes": sum(p.stat().st_size for p in target.glob("model.onnx*"))}
        report["genai"][quant] = entry
        if "unavailable" in entry:
            log(f"  {entry['unavailable']}")
            continue
        for count in threads:
            entry[f"threads_{count}"] = _json_run(
                [sys.executable, "-m", "covspec.bench.device.anchor", str(target), "--threads", str(count),
                 "--contexts", ",".join(str(c) for c in contexts), "--decode-tokens", str(decode_tokens)], log)


def goals(report: dict) -> dict:
    """The issue's goals against the measured figures (None where a figure is missing)."""
    from covspec.bench.device.anchor import floor_ms

    out: dict = {"decode_vs_genai": {}, "decode_vs_floor": {}, "growth_256_to_2048": {}, "prefill_speedup_keep_0.25": {},
                 "peak_rss_mb": {}, "device_run_peak_rss_mb": {}}
    contexts = [str(c) for c in report["contexts"]]
    for quant, entry in report["artifacts"].items():
        weights = sum(size for name, size in entry["files"].items() if name.startswith("decoder.onnx"))
        for key, probe in ((k, v) for k, v in entry.items() if k.startswith("threads_")):
            if "decode" not in probe:
                continue
            tag = f"{quant}/{key}"
            ms = {c: probe["decode"][c]["ms"] for c in contexts if c in probe["decode"]}
            out["peak_rss_mb"][tag] = round(probe["rss_peak_mb"], 1)
            if len(contexts) > 1 and contexts[0] in ms and contexts[-1] in ms:
                out["growth_256_to_2048"][tag] = round(ms[contexts[-1]] / ms[contexts[0]], 3)
            out["decode_vs_floor"][tag] = {c: round(ms[c] / floor_ms(weights, entry["decoder"], int(c),
                                                                       probe["bandwidth_gbs"]), 2) for c in ms}
            synthetic = probe["prefill_synthetic_s"]
            out["prefill_speedup_keep_0.25"][tag] = round(synthetic["1.0"]["s"] / synthetic["0.25"]["s"], 2)
            anchor = report["genai"].get(quant, {}).get(key, {})
            if anchor and "error" not in anchor:
                out["decode_vs_genai"][tag] = {c: round(ms[c] / anchor[c]["ms"], 3) for c in ms if c in anchor}
    for quant, entry in report["artifacts"].items():
        runs = entry.get("device_run", {})
        out["device_run_peak_rss_mb"][quant] = {mode: runs[mode].get("peak_rss_mb") for mode in ("lean", "resident")
                                                if mode in runs}
    out["targets"] = {"decode_vs_genai": "<= 1.2", "decode_vs_floor": "<= 2", "growth_256_to_2048": "<= 1.5",
                      "prefill_speedup_keep_0.25": ">= 3 (2,048 visual tokens)",
                      "peak_rss_mb": "probe (every graph open, 2,048-row prefills); the goal is device_run's",
                      "device_run_peak_rss_mb": "< 1024 for int4 (0.5B), covspec device run"}
    return out


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    contexts = [str(c) for c in report["contexts"]]
    lines = [f"# Device at real size: {report['config']}", "", report["description"], "",
             "| artifact | threads | MB | load s | peak RSS MB | vision s | visual tokens | prefill s (keep 1 / .5 / .25 "
             "/ .125) | synthetic 2048 prefill s (keep 1 / .25) | " + " | ".join(f"decode ms @{c}" for c in contexts)
             + " | " + " | ".join(f"copying ms @{c}" for c in contexts) + " |",
             "|" + "---|" * (9 + 2 * len(contexts))]
    for quant, entry in report["artifacts"].items():
        for key, probe in ((k, v) for k, v in entry.items() if k.startswith("threads_")):
            if "decode" not in probe:
                lines.append(f"| {quant} | {key[8:]} | error | | | | | | | |")
                continue
            prefill = " / ".join(f"{v['s']:.2f}" for v in probe["prefill_s"].values())
            synthetic = probe["prefill_synthetic_s"]
            decode = " | ".join(f"{probe['decode'][c]['ms']:.1f}" for c in contexts)
            copying = " | ".join(f"{probe['decode'][c].get('copying_ms', float('nan')):.1f}" for c in contexts)
            lines.append(f"| {quant} | {key[8:]} | {entry['bytes'] / 2**20:.0f} | {probe['load_s']:.2f} | "
                         f"{probe['rss_peak_mb']:.0f} | {probe['vision_s']:.2f} | {probe['visual_tokens']} | {prefill} | "
                         f"{synthetic['1.0']['s']:.2f} / {synthetic['0.25']['s']:.2f} | {decode} | {copying} |")
    runs = {quant: entry["device_run"] for quant, entry in report["artifacts"].items() if "device_run" in entry}
    if runs:
        lines += ["", "`covspec device run` (one question, the model itself as the target, 1 thread):", "",
                  "| artifact | memory | peak RSS MB | first token s | wall s | tokens | same answer |",
                  "|---|---|---|---|---|---|---|"]
        for quant, run in runs.items():
            for mode in ("lean", "resident"):
                got = run.get(mode, {})
                cells = "error | | |" if "error" in got else \
                    f"{got.get('peak_rss_mb')} | {got.get('ttft_s')} | {got.get('wall_s')} | {got.get('tokens')}"
                lines.append(f"| {quant} | {mode} | {cells} | {run.get('same_answer')} |")
    if report["genai"]:
        lines += ["", "onnxruntime-genai, same language model (per-token decode ms):", "",
                  "| precision | threads | MB | " + " | ".join(f"@{c}" for c in contexts) + " |",
                  "|" + "---|" * (3 + len(contexts))]
        for quant, entry in report["genai"].items():
            for key, probe in ((k, v) for k, v in entry.items() if k.startswith("threads_")):
                cells = " | ".join(f"{probe[c]['ms']:.1f}" if c in probe else "-" for c in contexts)
                lines.append(f"| {quant} | {key[8:]} | {entry.get('bytes', 0) / 2**20:.0f} | {cells} |")
            if "unavailable" in entry:
                lines.append(f"| {quant} | - | - | {entry['unavailable']} |")
    lines += ["", "Goals (measured / target):", "", "```", json.dumps(report["goals"], indent=1), "```", ""]
    return "\n".join(lines)
