"""Qwen2-VL / Qwen2.5-VL: dynamic resolution on the target, a fixed-size vision graph on the
device, the 2x2 patch merger, Qwen2.5's window attention and 3-D M-RoPE positions.

Preprocessing (``smart_resize``, the flat patch layout) and the 3-D positions of the
whole prompt (the text after the image too) in numpy against the model's image
processor and ``get_rope_index`` on non-square images of several sizes, with the
processor's token counts against the model's own; fp32 and int8 export with parity;
the device half at its export size equal to the processor; self-draft acceptance on
images of the export size (there the draft sees exactly what the target sees, so any
loss is a bug; on other sizes the draft sees a resized image and acceptance means
little); greedy exactness against ``generate()`` on five non-square images (the draft
at 64x48 or 96x96 while the target's resolution varies); sampling that follows the
target's distribution; edge positions independent of other sessions; ``device run``
with torch blocked. The draft's vocabulary has fewer padding rows than the target's
(72 vs 80 rows for one 64-token tokenizer).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from covspec.export.pipeline import ExportOptions, export_model
from covspec.families.common import fill_prompt
from covspec.families.qwen2vl import QWEN2VL
from covspec.families.qwen2vl.device import mrope_positions, pixel_values, smart_resize
from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl
from covspec.protocol.manifest import load_manifest
from covspec.protocol.verification import target_probs
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel
from family_checks import (check_conversation_exact, QUESTIONS, SIZES, check_greedy_exact, check_pruned_exact, check_sampling_follows,
                           co_generate, device_run_without_torch, noise, png, reference)

EXPORT_SIZE = (64, 48)                  # (width, height): 8 x 6 patches of 8 px, 4 x 3 merged tokens
MORE_SIZES = SIZES + [(200, 150), (31, 31), (64, 48)]


def build(root, version: str):
    save_tiny_qwen2vl(root / "draft", version=version, vocab_rows=72, seed=0)
    save_tiny_qwen2vl(root / "target", version=version, vocab_rows=80, seed=1, text_hidden=64, vision_layers=3)
    export_model(root / "target", root / "self-fp32", ExportOptions(quant="fp32", image_size=EXPORT_SIZE))
    model, processor = QWEN2VL.load(root / "target")
    return SimpleNamespace(root=root, model=model, processor=processor, target=QWEN2VL.target(model, processor))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Qwen2-VL: the draft in fp32 (default size 96x96) and int8 (64x48), the target as its own draft."""
    root = tmp_path_factory.mktemp("qwen2vl")
    built = build(root, "2")
    export_model(root / "draft", root / "draft-fp32", ExportOptions(quant="fp32"))
    export_model(root / "draft", root / "draft-int8", ExportOptions(quant="int8", min_agreement=0.0,
                                                                    image_size=EXPORT_SIZE))
    return built


@pytest.fixture(scope="module")
def edge(pair):
    with EdgeServer(pair.root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


def inputs_for(pair):
    return lambda image, question: pair.processor(images=image, text=fill_prompt(pair.target.template, question))


def test_manifests_record_size_parity_and_vocabulary(pair):
    draft, int8, target = (load_manifest(pair.root / name) for name in ("draft-fp32", "draft-int8", "self-fp32"))
    assert draft.source["family"] == "qwen2vl" and draft.image["size"] == [96, 96] and draft.num_visual_tokens == 36
    assert int8.image["size"] == [48, 64] and int8.num_visual_tokens == 12 and target.source["image_size"] == [64, 48]
    assert draft.parity["fp32"]["max_abs_diff_logits"] <= 1e-4
    assert draft.parity["fp32"]["greedy_match_tokens"] == draft.parity["fp32"]["greedy_tokens"]
    assert target.parity["fp32"]["max_abs_diff_logits"] <= 1e-4
    assert int8.quantization["scheme"] == "int8" and int8.parity["int8"]["positions"] >= 64
    assert draft.tokenizer["vocab_hash"] == target.tokenizer["vocab_hash"] and draft.tokenizer["vocab_size"] == 64
    assert draft.decoder["vocab_size"] == 72 and pair.model.get_output_embeddings().out_features == 80


def check_processor_and_positions(model, processor, template):
    """Numpy resize rule, patches and 3-D positions equal the processor's and ``get_rope_index``;
    the processor's token count equals the model's feature count."""
    ip, image_token = processor.image_processor, model.config.image_token_id
    spec = {"patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
            "rescale_factor": ip.rescale_factor, "mean": ip.image_mean, "std": ip.image_std, "resample": "bicubic"}
    counts = set()
    for width, height in MORE_SIZES:
        image = noise(width, height, seed=width)
        inputs = processor(images=image, text=fill_prompt(template, QUESTIONS[1]))
        grid = inputs["image_grid_thw"][0].tolist()
        size = smart_resize(height, width, ip.patch_size * ip.merge_size, ip.size["shortest_edge"],
                            ip.size["longest_edge"])
        assert [size[0] // ip.patch_size, size[1] // ip.patch_size] == grid[1:]
        patches = pixel_values(image, {**spec, "size": list(size)})
        assert np.abs(patches - inputs["pixel_values"].numpy()).max() <= 1e-5
        merged = (grid[1] // ip.merge_size, grid[2] // ip.merge_size)
        ids = inputs["input_ids"][0].tolist()
        positions, next_position = mrope_positions(ids, image_token, [merged])
        truth, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"])
        np.testing.assert_array_equal(positions, truth[:, 0].numpy())
        assert next_position == len(ids) + int(deltas[0, 0])
        after = len(ids) - 1 - ids[::-1].index(image_token)             # the text after the image
        assert after < len(ids) - 5 and positions[0, -1] == positions[1, -1] == positions[2, -1]
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        assert ids.count(image_token) == features.shape[0] == merged[0] * merged[1]
        counts.add(features.shape[0])
    assert len(counts) >= 4                      # the target's visual token count varies with the image


def test_preprocessing_and_positions_equal_the_models(pair):
    check_processor_and_positions(pair.model, pair.processor, pair.target.template)


def test_device_half_at_its_export_size(pair):
    """At the export size the device's patches and its draft context's 3-D positions are the
    processor's and the model's; other sizes are resized to it; pruned tokens keep theirs."""
    loaded = DraftArtifact.load(pair.root / "self-fp32")
    half = loaded.family
    image = noise(*EXPORT_SIZE, seed=2)
    inputs = inputs_for(pair)(image, QUESTIONS[0])
    feeds = half.vision_inputs(image)
    assert np.abs(feeds["pixel_values"] - inputs["pixel_values"].numpy()).max() <= 1e-5
    np.testing.assert_array_equal(feeds["image_grid_thw"], inputs["image_grid_thw"].numpy())
    assert half.vision_inputs(noise(100, 31))["pixel_values"].shape == feeds["pixel_values"].shape
    layout = half.prompt_layout(QUESTIONS[0], feeds)
    features = np.random.default_rng(0).standard_normal((12, 64)).astype(np.float32)
    context = half.draft_context(layout, features, np.arange(12), "original")
    truth, deltas = pair.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                    image_grid_thw=inputs["image_grid_thw"])
    np.testing.assert_array_equal(context.positions, truth[:, 0].numpy())
    assert context.next_position == inputs["input_ids"].shape[1] + int(deltas[0, 0])
    kept = np.array([0, 5, 11])
    pruned = half.draft_context(layout, features, kept, "original")
    start = len(layout.segments[0])
    columns = np.r_[np.arange(start), start + kept, start + 12 + np.arange(len(layout.segments[1]))]
    np.testing.assert_array_equal(pruned.positions, context.positions[:, columns])
    assert pruned.next_position == context.next_position
    contiguous = half.draft_context(layout, features, kept, "contiguous")
    np.testing.assert_array_equal(contiguous.positions, np.tile(np.arange(len(pruned)), (3, 1)))


def test_edge_positions_are_per_session_and_pruning_keeps_them(pair):
    """A session's cached extension is positioned from its own context, not the model's
    ``rope_deltas`` left by the last prefill; keeping every visual token through the pruned
    path (original positions) gives the unpruned logits."""
    target = TargetModel(pair.model, pair.processor, "cpu")
    small, wide = noise(57, 40, seed=1), noise(200, 150, seed=2)
    with torch.inference_mode():
        context = target.context(QUESTIONS[0], small)
        cache, first = target.prefill(context)
        alone = target.extend(cache, [int(first.argmax()), 7])
        target.rollback(cache, context.length)
        target.prefill(target.context(QUESTIONS[1], wide))        # another session moves rope_deltas
        np.testing.assert_allclose(target.extend(cache, [int(first.argmax()), 7]), alone, atol=1e-5)
        visual = int((context.inputs["input_ids"] == pair.model.config.image_token_id).sum())
        kept = target.context(QUESTIONS[0], small, keep=list(range(visual)))
        pruned_cache, pruned_first = target.prefill(kept)
        np.testing.assert_allclose(pruned_first, first, atol=1e-5)
        np.testing.assert_allclose(target.extend(pruned_cache, [int(first.argmax()), 7]), alone, atol=1e-5)


def self_draft(artifact, address: str, model, inputs_for_image, max_new_tokens: int = 20) -> float:
    """Self-draft acceptance on five images of the export size, each output equal to ``generate()``."""
    loaded = DraftArtifact.load(artifact)
    drafted = accepted = 0
    for seed, question in enumerate(QUESTIONS):
        image = noise(*EXPORT_SIZE, seed=10 + seed)
        tokens, stats = co_generate(loaded, address, png(image), question,
                                    GenerationSettings(max_new_tokens=max_new_tokens))
        assert tokens == reference(model, inputs_for_image(image, question), max_new_tokens)
        drafted, accepted = drafted + stats.drafted, accepted + sum(stats.accepted)
    assert drafted > 0
    return accepted / drafted


def test_self_draft_acceptance_and_greedy_exactness(pair, edge):
    assert self_draft(pair.root / "self-fp32", edge.address, pair.model, inputs_for(pair)) >= 0.95
    check_greedy_exact(pair.root / "draft-int8", edge.address, pair.model, inputs_for(pair))


def test_pruned_draft_is_exact(pair, edge):
    """Half the visual tokens kept (their 3-D positions kept) on the 96x96 draft."""
    image, question = noise(100, 31, seed=3), QUESTIONS[2]
    stats = check_pruned_exact(pair.root / "draft-fp32", edge.address, pair.model, inputs_for(pair), image, question)
    assert stats.kept_visual_tokens == 18


def test_device_run_without_torch(pair, edge, tmp_path, no_torch):
    image = noise(33, 90, seed=9)
    report = device_run_without_torch(no_torch, pair.root / "draft-int8", edge.address, tmp_path, image,
                                      QUESTIONS[3], 16)
    assert report["token_ids"] == reference(pair.model, inputs_for(pair)(image, QUESTIONS[3]), 16)


def target_joint(pair, image, question, temperature, top_k):
    """Exact target distribution of the first two generated tokens: {(t1, t2): prob}."""
    inputs = inputs_for(pair)(image, question)
    with torch.no_grad():
        first = target_probs(pair.model(**inputs).logits[0, -1].numpy(), temperature, top_k)
        joint = {}
        for t1 in np.nonzero(first)[0]:
            ids = torch.cat([inputs["input_ids"], torch.tensor([[t1]])], dim=1)
            logits = pair.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                                image_grid_thw=inputs["image_grid_thw"],
                                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 1).long()],
                                                            dim=1)).logits
            second = target_probs(logits[0, -1].numpy(), temperature, top_k)
            for t2 in np.nonzero(second)[0]:
                joint[(int(t1), int(t2))] = first[t1] * second[t2]
    return joint


def test_sampling_follows_target_distribution(pair, edge):
    """The first two committed tokens (the second from a draft with fewer vocabulary rows and
    another image size, verified) follow the target's p."""
    image, question = noise(50, 47, seed=5), QUESTIONS[0]
    temperature, top_k, runs = 1.5, 4, 600
    joint = target_joint(pair, image, question, temperature, top_k)
    check_sampling_follows(joint, pair.root / "draft-fp32", edge.address, image, question, temperature, top_k, runs)


def test_export_refuses_a_size_the_processor_would_change(pair, tmp_path):
    from covspec.cli.main import cli

    result = CliRunner().invoke(cli, ["export", str(pair.root / "draft"), "--out", str(tmp_path / "a"),
                                      "--image-size", "50x50"])
    assert result.exit_code == 2 and "--image-size" in result.output and "48x48" in result.output
    result = CliRunner().invoke(cli, ["export", str(pair.root / "draft"), "--out", str(tmp_path / "a"),
                                      "--image-size", "wide"])
    assert result.exit_code == 2 and "N or WxH" in result.output


def test_qwen25_window_attention_pair(tmp_path_factory):
    """Qwen2.5-VL (window attention with a full-attention block): processor and positions,
    parity, self-draft acceptance and greedy exactness of an int8 draft of another size."""
    pair25 = build(tmp_path_factory.mktemp("qwen25"), "2.5")
    check_processor_and_positions(pair25.model, pair25.processor, pair25.target.template)
    result = export_model(pair25.root / "draft", pair25.root / "draft-int8", ExportOptions(quant="int8",
                                                                                          min_agreement=0.0))
    assert result.manifest["parity"]["fp32"]["max_abs_diff_logits"] <= 1e-4
    assert load_manifest(pair25.root / "self-fp32").parity["fp32"]["max_abs_diff_logits"] <= 1e-4
    with EdgeServer(pair25.root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        assert self_draft(pair25.root / "self-fp32", server.address, pair25.model, inputs_for(pair25)) >= 0.95
        check_greedy_exact(pair25.root / "draft-int8", server.address, pair25.model, inputs_for(pair25))


def test_three_turn_conversations_are_exact(pair, edge):
    """Each turn's answer is the target's own answer to the whole conversation, device-led and edge-led."""
    check_conversation_exact(pair.root / "self-fp32", edge.address, pair.model, pair.processor, noise(64, 48), max_new_tokens=10)
