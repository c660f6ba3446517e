"""Anchors for the device measurements, run in the same bench: the same text decoder under
onnxruntime-genai, and the physical floor of a decode step.

- ``language_model_folder``: the draft's language model alone (its weights, as a
  transformers ``*ForCausalLM`` folder with the tokenizer) from the VLM folder;
- ``build_genai``: onnxruntime-genai's model builder on it (``-e cpu -p int4|int8|fp32``);
- ``genai_decode`` (``python -m covspec.bench.device.anchor MODEL --threads N``, a process
  of its own): per context length, ``append_tokens`` of that many tokens, then the median
  ``generate_next_token`` time (greedy) over ``decode_tokens`` steps;
- ``floor_ms``: bytes a decode step must read (the decoder's weights + the KV cache of
  the context) divided by the measured read bandwidth.

onnxruntime-genai is optional (``pip install onnxruntime-genai``): without it the
anchor reports ``unavailable`` with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from covspec.bench.harness.timing import median_step_ms, timed_s

CONTEXTS = (256, 1024, 2048)


def language_model_folder(vlm_folder: Path, out: Path) -> Path:
    """Save the VLM's language model + LM head as a ``*ForCausalLM`` folder with its tokenizer.

    The VLM's decoder is found by transformers' own accessor (``get_decoder()``:
    ``model.language_model`` in a LLaVA, ``model.text_model`` in an Idefics3 / SmolVLM),
    its head by ``get_output_embeddings()``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vlm = AutoModelForImageTextToText.from_pretrained(vlm_folder)
    text_config = AutoConfig.for_model(**vlm.config.text_config.to_dict())
    model = AutoModelForCausalLM.from_config(text_config)
    model.get_decoder().load_state_dict(vlm.get_decoder().state_dict())
    model.get_output_embeddings().load_state_dict(vlm.get_output_embeddings().state_dict())
    model.generation_config = vlm.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (vlm_folder / name).is_file():
            shutil.copyfile(vlm_folder / name, out / name)
    return out


def build_genai(model_folder: Path, out: Path, precision: str) -> dict:
    """onnxruntime-genai's builder -> {"folder", "build_s"} or {"unavailable": reason}."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return {"unavailable": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_folder),
                           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + ".cache"))],
                          capture_output=True, text=True)
    shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
    if done.returncode != 0:
        return {"unavailable": f"the model builder failed: {done.stderr.strip().splitlines()[-1:]}"}
    size = sum(path.stat().st_size for path in out.iterdir() if path.name.startswith("model.onnx"))
    return {"folder": str(out), "build_s": time.perf_counter() - began, "bytes": size}


def genai_decode(folder: Path, threads: int, contexts=CONTEXTS, decode_tokens: int = 16) -> dict:
    """Per context: median ms of one greedy ``generate_next_token`` after ``append_tokens``."""
    import onnxruntime_genai as og

    config_file = folder / "genai_config.json"
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    config["search"]["max_length"] = max(contexts) + decode_tokens + 8
    config_file.write_text(json.dumps(config, indent=2))
    model = og.Model(str(folder))
    vocab = int(config["model"]["vocab_size"])
    rng = np.random.default_rng(0)
    result = {}
    for length in contexts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + decode_tokens + 4, do_sample=False)
        generator = og.Generator(model, params)
        tokens = rng.integers(8, vocab, length).astype(np.int32)
        result[str(length)] = {"prefill_s": timed_s(lambda: generator.append_tokens(tokens)),
                               "ms": median_step_ms(generator.generate_next_token, decode_tokens)}
    return result


def decoder_bytes(artifact: Path, manifest: dict) -> int:
    """Bytes of the decoder graph file and its external data."""
    name = manifest["graphs"]["decoder"]["file"]
    return sum(entry["bytes"] for file, entry in manifest["files"].items() if file.startswith(name))


def kv_bytes(decoder: dict, context: int) -> int:
    """Bytes of float32 keys and values of ``context`` tokens over every layer."""
    return 2 * decoder["num_layers"] * decoder["num_kv_heads"] * decoder["head_dim"] * context * 4


def floor_ms(weights: int, decoder: dict, context: int, bandwidth_gbs: float) -> float:
    """The decode step's floor: its bytes read at the measured bandwidth, ms."""
    return (weights + kv_bytes(decoder, context)) / (bandwidth_gbs * 1e9) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description="onnxruntime-genai decode timing (one process)")
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contexts", default=",".join(str(c) for c in CONTEXTS))
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()
    contexts = tuple(int(c) for c in args.contexts.split(",") if c)
    print(json.dumps(genai_decode(args.model, args.threads, contexts, args.decode_tokens)))


if __name__ == "__main__":
    main()
