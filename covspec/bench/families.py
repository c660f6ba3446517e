"""Per-family figures on tiny configs: artifact sizes, parity, self-draft acceptance, device times.

For each family pair (a tiny random draft and a larger target, built from configs as
the tests build them): the draft exported in fp32, int8 and int4 (sizes of every
artifact file, fp32 parity as max abs logit difference, int8/int4 as top-1 agreement
with fp32, as the export measured them); the target exported as its own draft and
run against a real edge on non-square images (fixed draft length 4, keep ratio 1:
the share of drafted tokens accepted, which should be ~100%); and the device's
prefill (vision graph, packing, pruning off, decoder prefill) and per-token decode
times per quantization, medians over images and steps, one onnxruntime thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?",
             "what is the color of the square ?", "are there many shapes ?"]
SIZES = [(57, 40), (33, 90), (50, 47), (100, 31), (41, 64)]
QUANTS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class FamilyPair:
    """How to build a family's tiny draft and target folders: ``build(path, role)``."""

    name: str
    description: str
    build: Callable[[Path, str], Path]


def _llava_siglip(path: Path, role: str) -> Path:
    from covspec.hf.tiny import save_tiny_llava

    extra = {} if role == "draft" else {"text_hidden": 64, "vision_layers": 3}
    return save_tiny_llava(path, seed=0 if role == "draft" else 1, tower="siglip", language="qwen2", **extra)


def _onevision(path: Path, role: str) -> Path:
    from covspec.hf.tiny_onevision import save_tiny_onevision

    if role == "draft":
        return save_tiny_onevision(path, vocab_rows=72, seed=0)
    return save_tiny_onevision(path, vocab_rows=80, seed=1, text_hidden=64, vision_layers=3, max_tiles=1)


def _idefics3(path: Path, role: str) -> Path:
    from covspec.hf.tiny_idefics3 import save_tiny_idefics3

    extra = {} if role == "draft" else {"text_hidden": 64, "vision_layers": 3}
    return save_tiny_idefics3(path, seed=0 if role == "draft" else 1, **extra)


def _gemma3(path: Path, role: str) -> Path:
    from covspec.hf.tiny_gemma3 import save_tiny_gemma3

    extra = {} if role == "draft" else {"text_hidden": 64, "text_layers": 4, "vision_layers": 3}
    return save_tiny_gemma3(path, seed=0 if role == "draft" else 1, **extra)


def _qwen2vl(path: Path, role: str) -> Path:
    from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl

    if role == "draft":
        return save_tiny_qwen2vl(path, vocab_rows=72, seed=0)
    return save_tiny_qwen2vl(path, vocab_rows=80, seed=1, text_hidden=64, vision_layers=3)


PAIRS = {
    "llava-siglip": FamilyPair("llava-siglip", "LLaVA, SigLIP tower (32x32, patch 8: 16 visual tokens) + Qwen2; "
                               "draft text 32x2 layers, target text 64x2, vision 32x2 / 32x3", _llava_siglip),
    "onevision": FamilyPair("onevision", "LLaVA-OneVision, SigLIP tiles 32x32 (16 tokens each), pinpoints up to "
                            "3x3 tiles, Qwen2; draft text 32x2 (72 vocabulary rows), target text 64x2 (80 rows, "
                            "anyres_max_1)", _onevision),
    "idefics3": FamilyPair("idefics3", "Idefics3 / SmolVLM, SigLIP-like tiles 32x32 (patch 8, pixel shuffle 2: 4 "
                           "tokens each), longest edge 96 (up to 3x3 tiles + a global image), Llama; draft text "
                           "32x2, target text 64x2, vision 32x2 / 32x3", _idefics3),
    "qwen2vl": FamilyPair("qwen2vl", "Qwen2-VL, dynamic resolution (patch 8, 2x2 merger: 16 px per visual token, "
                          "32x32..96x96 px) on the target, the draft's vision graph at the default 96x96 (36 tokens), "
                          "3-D M-RoPE, Qwen2; draft text 32x2 (72 vocabulary rows), target text 64x2 (80 rows), "
                          "vision 32x2 / 32x3. Self-draft here runs on non-square images, which the target sees at "
                          "their own resolution and the draft resized to 96x96, so it is below 100% by design; "
                          "on images of the export size it is 100% (tests/test_family_qwen2vl.py)", _qwen2vl),
    "gemma3": FamilyPair("gemma3", "Gemma 3, SigLIP 32x32 (patch 4: 64 patches avg-pooled to 16 tokens), Gemma 3 "
                         "text with sliding-window (24 tokens) and global layers alternating, image tokens "
                         "bidirectional; draft text 32x2, target text 64x4, vision 32x2 / 32x3", _gemma3),
}


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def device_times(folder: Path, steps: int = 32) -> dict:
    """Median device prefill (ms, over ``SIZES``) and per-token decode (ms, over ``steps``) of an artifact."""
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.drafter import Drafter
    from covspec.runtime_device.options import DraftingOptions
    from covspec.runtime_device.prefill import prefill_draft

    artifact = DraftArtifact.load(folder, threads=1)
    drafter = Drafter.from_artifact(artifact)
    options = DraftingOptions(keep_ratio=1.0)
    prefill, decode, tokens = [], [], []
    for seed, (size, question) in enumerate(zip(SIZES, QUESTIONS)):
        image = _image(*size, seed)
        began = time.perf_counter()
        result = prefill_draft(artifact, drafter, image, question, options, seed=0)
        prefill.append(time.perf_counter() - began)
        tokens.append(result.visual_tokens)
        for step in range(steps if seed == 0 else 0):
            began = time.perf_counter()
            drafter.feed([5 + step % 10])
            decode.append(time.perf_counter() - began)
    return {"prefill_ms": 1000 * statistics.median(prefill), "token_ms": 1000 * statistics.median(decode),
            "visual_tokens": tokens}


def self_draft_acceptance(target: Path, artifact: Path, max_new_tokens: int = 20) -> dict:
    """Drafted and accepted tokens of ``artifact`` (the target as its own draft) over five
    prompts, device-led at a fixed length (raises ``NothingDrafted`` when nothing was drafted).

    The images are non-square, except for a family of dynamic resolution: there the
    target sees each image at its own resolution while the draft's vision graph takes one
    fixed size, so the images are of that size (the draft then sees what the target sees).
    """
    from covspec.families import family_named
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import EdgeClient, Backoff
    from covspec.runtime_device.engine import CoInference
    from covspec.runtime_device.options import DraftingOptions, GenerationSettings
    from covspec.runtime_device.stats import GenerationStats, require_drafting
    from covspec.runtime_edge import EdgeServer, ServerConfig

    options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0, keep_ratio=1.0)
    drafted = accepted = 0
    loaded = DraftArtifact.load(artifact)
    sizes = SIZES
    if family_named(loaded.manifest.source["family"]).dynamic_resolution:
        height, width = loaded.manifest.image["size"]
        sizes = [(width, height)] * len(SIZES)
    with EdgeServer(target, ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        client = EdgeClient(server.address, Backoff(timeout_s=10))
        try:
            engine = CoInference(loaded, client)
            for seed, (size, question) in enumerate(zip(sizes, QUESTIONS)):
                stats = GenerationStats()
                for _ in engine.generate(_png(_image(*size, seed)), question,
                                         GenerationSettings(max_new_tokens=max_new_tokens), options, stats):
                    pass
                drafted += stats.drafted
                accepted += sum(stats.accepted)
        finally:
            client.close()
    require_drafting(drafted, f"self-draft acceptance of {artifact}")
    return {"drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted}


def measure_family(pair: FamilyPair, root: Path, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Build, export and measure one family pair under ``root``; a JSON-able record."""
    from covspec.export.pipeline import ExportOptions, export_model

    draft, target = pair.build(root / "draft", "draft"), pair.build(root / "target", "target")
    rows = []
    for quant in QUANTS:
        progress(f"{pair.name}: export {quant}")
        result = export_model(draft, root / f"draft-{quant}", ExportOptions(quant=quant, min_agreement=0.0))
        manifest = result.manifest
        parity = manifest["parity"][quant] if quant != "fp32" else manifest["parity"]["fp32"]
        rows.append({"quant": quant, "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
                     "graph_bytes": {name: entry["bytes"] for name, entry in manifest["files"].items()},
                     "max_abs_diff_logits": manifest["parity"]["fp32"]["max_abs_diff_logits"],
                     "top1_agreement": parity.get("top1_agreement"), "variant": parity.get("variant"),
                     **device_times(result.folder)})
    progress(f"{pair.name}: self-draft")
    export_model(target, root / "self-fp32", ExportOptions(quant="fp32"))
    return {"family": pair.name, "description": pair.description, "quantizations": rows,
            "self_draft": self_draft_acceptance(target, root / "self-fp32")}


def family_table(record: dict) -> str:
    """One Markdown table of a ``measure_family`` record."""
    lines = ["| draft | artifact | parity | device prefill ms | device ms/token | visual tokens |",
             "|---|---|---|---|---|---|"]
    for row in record["quantizations"]:
        parity = (f"max abs logit diff {row['max_abs_diff_logits']:.1e}" if row["quant"] == "fp32"
                  else f"top-1 agreement {row['top1_agreement']:.1%} ({row['variant']})")
        tokens = sorted(set(row["visual_tokens"]))
        lines.append(f"| {row['quant']} | {row['bytes'] / 1024:.0f} KiB | {parity} | {row['prefill_ms']:.2f} | "
                     f"{row['token_ms']:.3f} | {', '.join(map(str, tokens))} |")
    self_draft = record["self_draft"]
    return (f"{record['description']}.\n\nSelf-draft acceptance (the target exported as its own fp32 draft, "
            f"device-led, fixed draft length 4, keep ratio 1, 5 images x 20 tokens; non-square, or of the export "
            f"size for a family of dynamic resolution): "
            f"{self_draft['accepted']}/{self_draft['drafted']} = {self_draft['acceptance']:.1%}.\n\n"
            + "\n".join(lines))
