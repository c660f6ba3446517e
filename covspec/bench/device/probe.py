"""One device measurement of one artifact, run in a process of its own (so that its peak
RSS is the artifact's): ``python -m covspec.bench.device.probe ARTIFACT --threads N``
prints one JSON object.

What it measures, with ``N`` onnxruntime threads, as the device runs the artifact:

- ``load_s``: manifest with hashes, sessions, the embedding table (memory-mapped), the
  family's device half; ``rss_load_mb`` right after;
- ``vision_s``: the vision graph on one image (after a warm-up run), ``visual_tokens``;
- ``prefill_s``: the draft's LM prefill of the prompt with the image's kept visual
  tokens, per keep ratio (evenly spaced kept tokens: the time does not depend on
  which), and ``prefill_synthetic_s``: the same over ``synthetic_visual`` stand-in
  visual tokens (an image of 1,000+ tokens at this size);
- ``decode``: per context length, the prefill time of a context of that many rows and
  the median per-token decode time after it (``decode_tokens`` single-token steps), with
  the artifact's cache and, for comparison, with the copying cache (``copying_ms``:
  the past fed and returned every step, as before the shared buffer);
- ``rss_peak_mb``: the process's peak resident memory up to here (the copying cache
  and the bandwidth test come after it);
- ``bandwidth_gbs``: this machine's read bandwidth (numpy sum over 512 MiB, best of 5).

Numpy, onnxruntime, tokenizers and pillow only: no torch, as on the device.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from covspec.bench.harness.timing import median_step_ms, timed_s
from covspec.runtime_device.memory import peak_rss_mb, rss_mb

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)
CONTEXTS = (256, 1024, 2048)
QUESTION = "what color is the circle ?"


def read_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second numpy reads from memory (one core), GB/s."""
    data = np.ones(mib * 2 ** 20 // 4, np.float32)
    best = min(timed_s(lambda: float(data.sum())) for _ in range(repeats))
    return mib * 2 ** 20 / best / 1e9


def kept_evenly(n: int, ratio: float) -> np.ndarray:
    k = max(1, int(round(n * ratio)))
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def probe(folder: Path, threads: int, contexts=CONTEXTS, keep_ratios=KEEP_RATIOS, synthetic_visual: int = 2048,
          decode_tokens: int = 16, copying: bool = True) -> dict:
    from PIL import Image
    from covspec.families import DraftContext
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.drafter import Drafter

    began = time.perf_counter()
    artifact = DraftArtifact.load(folder, threads)        # resident: every graph open, as a long-lived app
    manifest, half, decoder, embed = artifact.manifest, artifact.family, artifact.decoder, artifact.embed
    result = {"threads": threads, "load_s": time.perf_counter() - began, "rss_load_mb": rss_mb(),
              "kv_cache": manifest.decoder.get("kv_cache", "concat"), "embedding_dtype": manifest.embedding["dtype"]}
    drafter = Drafter(decoder, manifest.decoder, embed)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    feeds = half.vision_inputs(image)
    artifact.encode_image(feeds)
    result["vision_s"] = timed_s(lambda: artifact.encode_image(feeds))
    visual, _ = half.pack_visual_tokens(feeds, *artifact.encode_image(feeds))
    layout = half.prompt_layout(QUESTION, feeds)
    result["visual_tokens"] = int(visual.shape[0])
    result["prefill_s"] = {}
    for ratio in keep_ratios:
        context = half.draft_context(layout, visual, kept_evenly(visual.shape[0], ratio), "original")
        result["prefill_s"][str(ratio)] = {"rows": len(context), "s": timed_s(lambda: drafter.prefill(context))}
    text = sum(len(segment) for segment in layout.segments)
    result["prefill_synthetic_s"] = {"visual_tokens": synthetic_visual}
    width = manifest.decoder["hidden_size"]
    for ratio in keep_ratios:
        rows = text + len(kept_evenly(synthetic_visual, ratio))
        context = DraftContext(rng.standard_normal((rows, width)).astype(np.float32) * 0.02,
                               np.arange(rows, dtype=np.int64), rows)
        result["prefill_synthetic_s"][str(ratio)] = {"rows": rows, "s": timed_s(lambda: drafter.prefill(context))}
    result["decode"] = {}
    vocab = int(manifest.decoder["vocab_size"])
    contexts_rows = {length: DraftContext(rng.standard_normal((length, width)).astype(np.float32) * 0.02,
                                          np.arange(length, dtype=np.int64), length) for length in contexts}
    for length, context in contexts_rows.items():
        result["decode"][str(length)] = {"prefill_s": timed_s(lambda: drafter.prefill(context)),
                                         "ms": _decode_ms(drafter, rng, vocab, decode_tokens)}
    result["rss_peak_mb"] = peak_rss_mb()          # the device's own peak: before the comparisons below
    if copying:
        copier = Drafter(decoder, manifest.decoder, embed, kv_cache="concat")
        for length, context in contexts_rows.items():
            copier.prefill(context)
            result["decode"][str(length)]["copying_ms"] = _decode_ms(copier, rng, vocab, decode_tokens)
    result["bandwidth_gbs"] = read_bandwidth_gbs()
    return result


def _decode_ms(drafter, rng, vocab: int, count: int) -> float:
    """Median milliseconds of ``count`` single-token steps, random tokens."""
    return median_step_ms(lambda: drafter.feed([int(rng.integers(vocab))]), count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contexts", default=",".join(str(c) for c in CONTEXTS))
    parser.add_argument("--synthetic-visual", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--no-copying", action="store_true")
    args = parser.parse_args()
    contexts = tuple(int(c) for c in args.contexts.split(",") if c)
    print(json.dumps(probe(args.artifact, args.threads, contexts, synthetic_visual=args.synthetic_visual,
                           decode_tokens=args.decode_tokens, copying=not args.no_copying)))


if __name__ == "__main__":
    main()
