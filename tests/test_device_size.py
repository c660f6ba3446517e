"""The device at real size, in small: graphs with external data (what an export past 2 GiB
writes) round-trip through export, quantization and the device; the embedding table in
the artifact's precision; the bench's probe, goals and report on a tiny artifact.

The real-size run is ``covspec bench device --config NAME`` (tens of minutes); the
export past 2 GiB is ``COVSPEC_SLOW=1`` below."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from covspec.bench.device import probe as device_probe
from covspec.bench.device.size import CONFIGS, goals, markdown, run_bench
from covspec.cli.bench_device_cmd import device
from covspec.export import onnx_files
from covspec.export.embedding import write_table
from covspec.export.pipeline import ExportOptions, export_model
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol.manifest import load_manifest
from covspec.runtime_device.embedding import QuantizedTable, load_table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("model") / "tiny", text_layers=3)


@pytest.fixture(scope="module")
def external_int8(tiny, tmp_path_factory):
    """An int8 artifact exported with every graph's weights in external data."""
    out = tmp_path_factory.mktemp("artifacts") / "external-int8"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 0)
        export_model(tiny, out, ExportOptions(quant="int8", min_agreement=0.0))
    return out


def test_graphs_with_external_data_round_trip_through_export_and_the_device(external_int8):
    manifest = load_manifest(external_int8)                      # every file hashed, the data files too
    assert {"decoder.onnx.data", "vision.onnx.data"} <= set(manifest.files)
    assert onnx_files.data_files(external_int8 / "decoder.onnx") == ["decoder.onnx.data"]
    assert sorted(p.name for p in external_int8.iterdir() if p.suffix in (".onnx", ".data")) == [
        "decoder.onnx", "decoder.onnx.data", "scorer.onnx", "vision.onnx", "vision.onnx.data"]
    assert manifest.parity["fp32"]["max_abs_diff_logits"] <= 1e-4      # the fp32 graphs ran from external data
    assert manifest.parity["int8"]["positions"] >= 64
    assert manifest.decoder["kv_cache"] == "shared-buffer"
    result = device_probe.probe(external_int8, threads=1, contexts=(16, 40), synthetic_visual=32, decode_tokens=2)
    assert result["visual_tokens"] == 16 and set(result["decode"]) == {"16", "40"}
    assert result["decode"]["40"]["ms"] > 0 and result["decode"]["40"]["copying_ms"] > 0
    assert result["prefill_synthetic_s"]["0.25"]["rows"] < result["prefill_synthetic_s"]["1.0"]["rows"]
    assert result["rss_peak_mb"] >= result["rss_load_mb"] > 0 and result["bandwidth_gbs"] > 0


def test_the_embedding_table_is_stored_in_the_artifacts_precision(external_int8, tiny, tmp_path):
    manifest = load_manifest(external_int8)
    assert manifest.embedding["dtype"] == "int8" and manifest.embedding["block_size"] == 32
    table = load_table(external_int8, manifest.embedding)
    assert isinstance(table, QuantizedTable) and table.shape == tuple(manifest.embedding["shape"])
    # A reader expecting the float32 table [V, D] finds another shape and refuses, never misreads.
    assert np.load(external_int8 / manifest.embedding["file"]).shape != table.shape
    rng = np.random.default_rng(0)
    full = rng.standard_normal((50, 64)).astype(np.float32)
    for dtype, levels in (("int8", 127), ("int4", 7)):
        section, seen = write_table(full, tmp_path, dtype)
        stored = load_table(tmp_path, section)
        ids = [3, 0, 49, 3]
        np.testing.assert_array_equal(stored[ids], seen[ids])          # the device reads what parity measured
        assert stored[7].shape == (64,)
        step = np.abs(full).reshape(50, 2, 32).max(-1, keepdims=True) / levels
        assert np.all(np.abs(seen - full).reshape(50, 2, 32) <= step / 2 + 1e-6)
        assert stored.nbytes < full.nbytes / (3.5 if dtype == "int8" else 6)
    section, seen = write_table(full, tmp_path, "float32")
    np.testing.assert_array_equal(load_table(tmp_path, section)[[1, 2]], full[[1, 2]])


def test_goals_and_report_read_the_probe(external_int8):
    probe = device_probe.probe(external_int8, threads=1, contexts=(16, 40), synthetic_visual=32, decode_tokens=2,
                               copying=False)
    manifest = load_manifest(external_int8)
    report = {"config": "tiny", "description": "tiny", "contexts": [16, 40],
              "artifacts": {"int8": {"files": {n: f["bytes"] for n, f in manifest.files.items()},
                                     "bytes": 1, "decoder": manifest.decoder, "threads_1": probe}},
              "genai": {"int8": {"threads_1": {"16": {"ms": probe["decode"]["16"]["ms"]},
                                               "40": {"ms": probe["decode"]["40"]["ms"] / 2}}}}}
    report["goals"] = goals(report)
    assert report["goals"]["decode_vs_genai"]["int8/threads_1"] == {"16": 1.0, "40": 2.0}
    assert report["goals"]["decode_vs_floor"]["int8/threads_1"]["16"] > 0
    assert "| int8 | 1 |" in markdown(report)


def test_the_cli_offers_every_config_and_refuses_others():
    option = next(param for param in device.params if param.name == "config_name")
    assert set(option.type.choices) == set(CONFIGS) >= {"smolvlm-256m", "llava-smollm2-135m"}
    result = CliRunner().invoke(device, ["--config", "paligemma-3b"])
    assert result.exit_code == 2 and "'paligemma-3b' is not one of" in result.output
    with pytest.raises(ValueError, match="unknown config"):
        run_bench("paligemma-3b", "unused")


@pytest.mark.skipif(not os.environ.get("COVSPEC_SLOW"), reason="exports a 3.5 GB decoder (COVSPEC_SLOW=1)")
def test_a_decoder_over_2_gib_round_trips(tmp_path):
    """A Llama language model of 0.9B parameters: fp32 past 2 GiB (external data), int8 from it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from covspec.export.graphs import export_graph
    from covspec.export.quantize import quantize
    from covspec.families import DraftContext
    from covspec.families.text_export import FlatCacheDecoder, decoder_graph, decoder_spec
    from covspec.runtime_device.artifact import open_graph
    from covspec.runtime_device.drafter import Drafter

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    spec = decoder_spec(config, config.vocab_size)
    decoder = FlatCacheDecoder(model.model, model.lm_head, config).eval()
    export_graph(decoder_graph(decoder, spec), tmp_path / "decoder.onnx", 18, "torchscript")
    assert onnx_files.data_files(tmp_path / "decoder.onnx") == ["decoder.onnx.data"]
    assert (tmp_path / "decoder.onnx.data").stat().st_size > 2 ** 31
    quantize("int8", tmp_path / "decoder.onnx", tmp_path / "decoder.int8.onnx")
    table = model.model.embed_tokens.weight.detach().numpy()
    context = DraftContext(table[:40], np.arange(40), 40)
    with torch.no_grad():
        expected = model(input_ids=torch.arange(41)[None]).logits[0, -1].numpy()
    logits = {}
    for name in ("decoder.onnx", "decoder.int8.onnx"):
        drafter = Drafter(open_graph(tmp_path / name, threads=2), {**spec.to_dict(), "kv_cache": "shared-buffer"},
                          lambda ids: table[np.asarray(ids)])
        drafter.prefill(context)
        logits[name] = drafter.feed([40])[-1]
    assert np.abs(logits["decoder.onnx"] - expected).max() < 1e-3
    assert logits["decoder.int8.onnx"].argmax() == expected.argmax() or np.corrcoef(
        logits["decoder.int8.onnx"], expected)[0, 1] > 0.9
