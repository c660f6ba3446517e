"""Fused decoder layers (one q/k/v and one gate/up projection, onnxruntime's RotaryEmbedding)
decode as the model's own layers do, in torch and in onnxruntime, at positions with gaps,
for every rope the models compute (including scaled ones); other layer kinds keep the
traced path; the model is left as it was."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from covspec.export.graphs import export_graph
from covspec.families.fused_layers import fusable, rotary_embedding, rotary_rows
from covspec.families.text_export import FlatCacheDecoder, decoder_graph, decoder_spec
from covspec.runtime_device.artifact import open_graph
from covspec.runtime_device.drafter import Drafter
from covspec.families import DraftContext

BOUND = 1e-5


def text_model(language: str, extra: dict):
    """A tiny seeded causal LM of ``language`` (llama, qwen2, mistral) with ``extra`` config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(language, vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(config).eval()


MODELS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    "qwen2-bias": ("qwen2", {}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_rotary_op_rotates_as_the_model_does(name):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = text_model(*MODELS[name])
    positions = torch.tensor([[0, 3, 4, 40, 41, 200]])          # gaps: pruned visual tokens keep theirs
    cos, sin = model.model.rotary_emb(torch.zeros(1), positions)
    x = torch.randn(1, 6, 4 * 8)
    expected, _ = apply_rotary_pos_emb(x.view(1, 6, 4, 8).transpose(1, 2), x.view(1, 6, 4, 8).transpose(1, 2), cos, sin)
    rows, caches = rotary_rows(model.model, x, positions)
    got = rotary_embedding(x, rows, *caches, 4)
    assert torch.allclose(got, expected.transpose(1, 2).reshape(1, 6, 32), atol=1e-6)


def flat_decoders(model, fuse: bool):
    return FlatCacheDecoder(model.model, model.lm_head, model.config, fuse=fuse).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_graphs_decode_as_the_models_own_layers(name, tmp_path):
    model = text_model(*MODELS[name])
    assert fusable(model.model)
    spec = decoder_spec(model.config, model.config.vocab_size)
    reference = model(torch.arange(7)[None]).logits
    paths = {}
    for fuse in (True, False):
        paths[fuse] = tmp_path / f"fuse-{fuse}.onnx"
        export_graph(decoder_graph(flat_decoders(model, fuse), spec), paths[fuse], 18, "torchscript")
    assert torch.equal(model(torch.arange(7)[None]).logits, reference)           # the model is as it was
    ops = {fuse: collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
           for fuse, path in paths.items()}
    assert ops[True]["RotaryEmbedding"] == 2 * 2 and ops[False]["RotaryEmbedding"] == 0
    assert sum(ops[True].values()) < 0.6 * sum(ops[False].values())
    table = model.model.embed_tokens.weight.detach().numpy()
    drafters = [Drafter(open_graph(paths[fuse]), {**spec.to_dict(), "kv_cache": "shared-buffer"},
                        lambda ids: table[np.asarray(ids)], prefill_chunk=4) for fuse in (True, False)]
    rng = np.random.default_rng(0)
    # positions with gaps, past the model's max_position_embeddings (256): a draft never stops for length
    context = DraftContext(rng.standard_normal((9, 32)).astype(np.float32), np.arange(9, dtype=np.int64) * 40 + 1, 400)
    results = [[d.prefill_rows(context, [5, 6]), d.feed([7]), d.feed([8, 9])] for d in drafters]
    for fused, traced in zip(*results):
        assert float(np.abs(fused - traced).max()) <= BOUND


def test_gemma3_and_qwen2vl_layers_keep_the_traced_path(tmp_path):
    from covspec.families import family_for_folder
    from covspec.hf.tiny_gemma3 import save_tiny_gemma3
    from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl

    for save in (save_tiny_gemma3, save_tiny_qwen2vl):
        folder = save(tmp_path / save.__name__, seed=1)
        family = family_for_folder(folder)
        half = family.exporter(*family.load(folder))
        assert not fusable(half.decoder.language_model)
        assert getattr(half.decoder, "fused", None) is None
