"""The shared-buffer KV cache (GroupQueryAttention graphs bound to preallocated buffers)
decodes exactly as the copying cache on the concatenating graph did: prefill (chunked or
not), steps, rollback, forks that overwrite each other's rows, growth past the capacity,
sliding windows."""

from __future__ import annotations

import numpy as np
import pytest

from covspec.export.graphs import export_graph, kv_cache_layout
from covspec.families import DraftContext, family_for_folder
from covspec.families.text_export import FlatCacheDecoder, decoder_graph
from covspec.hf.tiny import save_tiny_llava
from covspec.runtime_device import kv_cache
from covspec.runtime_device.artifact import open_graph
from covspec.runtime_device.drafter import Drafter

BOUND = 1e-5


@pytest.fixture(scope="module", params=["llama", "qwen2-window"])
def graphs(request, tmp_path_factory):
    """(shared-buffer graph, concat graph, decoder spec, embedding table) of one tiny model."""
    root = tmp_path_factory.mktemp(request.param)
    window = {"language": "qwen2", "sliding_window": 6} if request.param == "qwen2-window" else {}
    folder = save_tiny_llava(root / "model", seed=2, text_layers=3, **window)
    family = family_for_folder(folder)
    model, processor = family.load(folder)
    half = family.exporter(model, processor)
    assert half.decoder.kv_cache == "shared-buffer"
    concat = FlatCacheDecoder(half.decoder.language_model, half.decoder.lm_head, model.config.text_config,
                              kv_cache="concat").eval()
    spec = half.decoder_spec.to_dict()
    export_graph(decoder_graph(half.decoder, half.decoder_spec), root / "shared.onnx", 18, "torchscript")
    export_graph(decoder_graph(concat, half.decoder_spec), root / "concat.onnx", 18, "torchscript")
    assert kv_cache_layout(root / "shared.onnx", spec["past_input_names"]) == "shared-buffer"
    assert kv_cache_layout(root / "concat.onnx", spec["past_input_names"]) == "concat"
    table = half.embed_tokens()
    return root / "shared.onnx", root / "concat.onnx", spec, table


def drafters(graphs, prefill_chunk: int) -> tuple[Drafter, Drafter]:
    shared_path, concat_path, spec, table = graphs

    def embed(ids):
        return table[np.asarray(ids, dtype=np.int64)]

    shared = Drafter(open_graph(shared_path), {**spec, "kv_cache": "shared-buffer"}, embed,
                     prefill_chunk=prefill_chunk)
    current = Drafter(open_graph(concat_path), {**spec, "kv_cache": "concat"}, embed)
    assert isinstance(shared.cache, kv_cache.SharedBufferCache)
    assert isinstance(current.cache, kv_cache.CopyingCache)
    return shared, current


def context(table: np.ndarray, length: int, seed: int = 0) -> DraftContext:
    """``length`` rows of random embeddings at positions with gaps (pruned visual tokens)."""
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((length, table.shape[1])).astype(np.float32)
    return DraftContext(embeds, np.arange(length, dtype=np.int64) * 2 + 1, 2 * length + 5)


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) <= BOUND


@pytest.mark.parametrize("prefill_chunk", [0, 5])
def test_shared_buffer_decoding_equals_the_copying_cache(graphs, prefill_chunk, monkeypatch):
    monkeypatch.setattr(kv_cache, "ROW_BLOCK", 8)      # small capacities: the steps below grow the buffers
    monkeypatch.setattr(kv_cache, "HEADROOM", 2)
    shared, current = drafters(graphs, prefill_chunk)
    table = graphs[3]
    both = (shared, current)
    ctx = context(table, 17)
    close(*(d.prefill_rows(ctx, [5, 6, 7]) for d in both))
    close(*(d.prefill(ctx) for d in both))
    for tokens in ([3], [4, 5, 6], [7], [8, 9]):
        close(*(d.feed(tokens) for d in both))
    start = shared.cache.capacity
    branch = [d.snapshot() for d in both]                  # 7 generated tokens
    for d in both:
        d.truncate(2)
    close(*(d.feed([10, 11, 12]) for d in both))         # overwrites rows the first branch holds
    other = [d.snapshot() for d in both]
    close(*(d.extend_to([3, 4, 13, 13, 13, 13]) for d in both))
    for d, state in zip(both, branch):
        d.restore(state)
    assert shared.fed == current.fed == [3, 4, 5, 6, 7, 8, 9]
    close(*(d.feed([14]) for d in both))
    for d, state in zip(both, other):
        d.restore(state)
    assert shared.fed == [3, 4, 10, 11, 12]
    close(*(d.feed(list(range(15, 27))) for d in both))  # grows past the capacity
    assert shared.cache.capacity > start
    for d, state in zip(both, branch):
        d.restore(state)
    close(*(d.feed([14]) for d in both))
    close(*(d.extend_to([3, 4, 5, 6, 7, 8, 9, 14, 20]) for d in both))


def test_steps_write_in_place_and_rollback_copies_nothing(graphs):
    shared, _ = drafters(graphs, prefill_chunk=4)
    shared.prefill(context(graphs[3], 9))
    buffers = list(shared.cache.buffers)
    for token in range(10):
        shared.feed([token])
    shared.truncate(3)
    shared.feed([1, 2])
    assert all(a is b for a, b in zip(buffers, shared.cache.buffers))   # same memory all along
    assert shared.cache.rows == 9 + 5


def test_a_snapshot_from_before_the_last_prefill_is_refused(graphs):
    shared, _ = drafters(graphs, prefill_chunk=0)
    shared.prefill(context(graphs[3], 6))
    shared.feed([3, 4])
    state = shared.snapshot()
    shared.prefill(context(graphs[3], 7, seed=1))
    with pytest.raises(ValueError, match="before the last prefill"):
        shared.restore(state)


def test_prefill_asks_for_the_last_row_only(graphs):
    shared, current = drafters(graphs, prefill_chunk=4)
    assert shared.takes_num_logits and not current.takes_num_logits
    ctx = context(graphs[3], 11)
    last = shared.prefill(ctx)
    close(last, current.prefill(ctx))
    close(shared.prefill_rows(ctx)[-1], last)


def test_the_dynamo_export_shares_the_buffer_too(tmp_path):
    """dynamo emits GroupQueryAttention on the past too (its Shape of a past's batch axis
    does not read the cache), and its graph decodes alike with either cache."""
    folder = save_tiny_llava(tmp_path / "model", seed=2, text_layers=3)
    family = family_for_folder(folder)
    half = family.exporter(*family.load(folder))
    spec, table = half.decoder_spec.to_dict(), half.embed_tokens()
    export_graph(decoder_graph(half.decoder, half.decoder_spec), tmp_path / "dynamo.onnx", 18, "dynamo")
    assert kv_cache_layout(tmp_path / "dynamo.onnx", spec["past_input_names"]) == "shared-buffer"
    drafters = [Drafter(open_graph(tmp_path / "dynamo.onnx"), {**spec, "kv_cache": layout},
                        lambda ids: table[np.asarray(ids)], prefill_chunk=4) for layout in ("shared-buffer", "concat")]
    ctx = context(table, 9)
    close(*(d.prefill(ctx) for d in drafters))
    close(*(d.feed([3, 4]) for d in drafters))
