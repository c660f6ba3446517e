"""LLaVA-OneVision: any-resolution tiling, packing (unpad, shrink, newline tokens) and the
prompt's image token count in numpy against the model's image processor and the
model itself on non-square images; fp32 and int8 export with parity; self-draft
acceptance; greedy exactness against ``generate()``; sampling that follows the
target's distribution; ``device run`` with torch blocked. The draft's vocabulary has
fewer padding rows than the target's (72 vs 80 rows for one 64-token tokenizer), and
the target shrinks its packed grid ("anyres_max_1") where the draft does not."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from covspec.export.pipeline import ExportOptions, export_model
from covspec.families.common import fill_prompt
from covspec.families import family_for_folder
from covspec.families.onevision.device import image_token_count, pack
from covspec.hf.tiny_onevision import save_tiny_onevision
from covspec.protocol.manifest import load_manifest
from covspec.protocol.verification import target_probs
from covspec.runtime_device.artifact import DraftArtifact, run_vision
from covspec.runtime_edge import EdgeServer, ServerConfig
from family_checks import (check_conversation_exact, QUESTIONS, SIZES, acceptance, check_greedy_exact, check_pruned_exact, check_sampling_follows,
                           device_run_without_torch, noise, reference)

MORE_SIZES = SIZES + [(200, 150), (31, 31)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("onevision")
    save_tiny_onevision(root / "draft", vocab_rows=72, seed=0)
    save_tiny_onevision(root / "target", vocab_rows=80, seed=1, text_hidden=64, vision_layers=3, max_tiles=1)
    export_model(root / "draft", root / "draft-fp32", ExportOptions(quant="fp32"))
    export_model(root / "draft", root / "draft-int8", ExportOptions(quant="int8", min_agreement=0.0))
    export_model(root / "target", root / "self-fp32", ExportOptions(quant="fp32"))
    family = family_for_folder(root / "target")
    model, processor = family.load(root / "target")
    return SimpleNamespace(root=root, model=model, processor=processor, template=family.target(model, processor).template)


@pytest.fixture(scope="module")
def edge(pair):
    with EdgeServer(pair.root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


def inputs_for(pair):
    return lambda image, question: pair.processor(images=image, text=fill_prompt(pair.template, question))


def test_manifests_record_tiling_parity_and_vocabulary(pair):
    draft, int8, target = (load_manifest(pair.root / name) for name in ("draft-fp32", "draft-int8", "self-fp32"))
    assert draft.source["family"] == "onevision" and draft.image["grid_pinpoints"][-1] == [96, 96]
    assert draft.image["side"] == 4 and len(draft.image["image_newline"]) == 32
    assert draft.parity["fp32"]["max_abs_diff_logits"] <= 1e-4
    assert draft.parity["fp32"]["greedy_match_tokens"] == draft.parity["fp32"]["greedy_tokens"]
    assert int8.quantization["scheme"] == "int8" and int8.parity["int8"]["positions"] >= 64
    # One tokenizer, different padding rows: the device's logits are narrower than the edge's.
    assert draft.tokenizer["vocab_hash"] == target.tokenizer["vocab_hash"] and draft.tokenizer["vocab_size"] == 64
    assert draft.decoder["vocab_size"] == 72 and pair.model.get_output_embeddings().out_features == 80


def test_a_target_token_beyond_the_drafts_rows_is_embedded_as_padding(pair):
    """The edge may commit an id among the target's extra padding rows (72..79): the draft
    embeds it as its pad token instead of failing (only the draft sees it)."""
    artifact = DraftArtifact.load(pair.root / "draft-fp32")
    pad = artifact.manifest.tokenizer["pad_id"]
    np.testing.assert_array_equal(artifact.embed([5, 79]), artifact.embed_tokens[[5, pad]])


@pytest.mark.parametrize("artifact", ["draft-fp32", "self-fp32"])
def test_tiles_counts_and_packed_features_equal_the_model(pair, artifact):
    """Pixel values equal the image processor's, the token count the model's (and the
    processor's own formula), and the packed features through the exported graph the
    model's ``get_image_features`` (the target shrinks its grid, the draft does not)."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    loaded = DraftArtifact.load(pair.root / artifact)
    folder = pair.root / ("draft" if artifact == "draft-fp32" else "target")
    model, processor = family_for_folder(folder).load(folder)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    formula = SimpleNamespace(image_processor=processor.image_processor, num_image_tokens=side * side,
                              vision_aspect_ratio=model.config.vision_aspect_ratio,
                              _get_unpadded_features=lambda *args: LlavaOnevisionProcessor._get_unpadded_features(
                                  formula, *args))
    counts = set()
    for width, height in MORE_SIZES:
        image = noise(width, height, seed=width)
        expected = processor.image_processor(images=image, return_tensors="pt")
        feeds = loaded.family.vision_inputs(image)
        assert feeds["pixel_values"].shape == expected["pixel_values"].shape[1:]
        assert np.abs(feeds["pixel_values"] - expected["pixel_values"][0].numpy()).max() <= 1e-5
        with torch.no_grad():
            truth = model.model.get_image_features(pixel_values=expected["pixel_values"],
                                                   image_sizes=expected["image_sizes"]).pooler_output[0].numpy()
        features, activity = loaded.family.pack_visual_tokens(feeds, *run_vision(loaded.vision, feeds))
        count = image_token_count(height, width, loaded.manifest.image)
        assert count == truth.shape[0] == features.shape[0] == activity.shape[0]
        assert count == LlavaOnevisionProcessor._get_number_of_features(formula, height, width, 32, 32)
        assert np.abs(features - truth).max() <= 1e-5
        counts.add(count)
    assert len(counts) >= 3                      # a variable number of visual tokens per image


def test_prompt_ids_equal_the_processors(pair):
    loaded = DraftArtifact.load(pair.root / "self-fp32")
    image = noise(33, 90)
    ids = inputs_for(pair)(image, QUESTIONS[0])["input_ids"][0].tolist()
    before, after = loaded.family.prompt_layout(QUESTIONS[0]).segments
    n = image_token_count(90, 33, loaded.manifest.image)
    assert list(before) + [pair.model.config.image_token_id] * n + list(after) == ids


def test_pack_shrinks_like_torch_bilinear():
    """A grid beyond "anyres_max_1" is shrunk exactly as torch's bilinear interpolation."""
    spec = {"tile": 32, "side": 4, "grid_pinpoints": [[64, 96]], "vision_aspect_ratio": "anyres_max_1"}
    features = np.random.default_rng(0).standard_normal((7, 16, 5)).astype(np.float32)
    activity = np.linalg.norm(features, axis=-1)
    newline = np.ones(5, np.float32)
    packed, packed_activity = pack(features, activity, 64, 96, newline, spec)
    grid = torch.from_numpy(features[1:]).view(2, 3, 4, 4, 5).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    ratio = np.sqrt(8 * 12 / 16)                                        # 2.45 > 1.1: shrink to 3 x 4
    shrunk = torch.nn.functional.interpolate(grid[None], [int(8 // ratio), int(12 // ratio)], mode="bilinear")[0]
    with_newline = torch.cat([shrunk, torch.ones(5, shrunk.shape[1], 1)], dim=-1).flatten(1, 2).T
    np.testing.assert_allclose(packed, np.concatenate([features[0], with_newline.numpy()]), atol=1e-5)
    assert shrunk.shape[1:] == (3, 4) and packed_activity.shape == (16 + 3 * 5,)
    assert packed_activity[16 + 4] == pytest.approx(np.sqrt(5))        # the first row's newline


def test_self_draft_acceptance_and_greedy_exactness(pair, edge):
    stats = check_greedy_exact(pair.root / "self-fp32", edge.address, pair.model, inputs_for(pair))
    assert acceptance(stats) >= 0.95
    check_greedy_exact(pair.root / "draft-int8", edge.address, pair.model, inputs_for(pair))


def test_pruned_draft_is_exact(pair, edge):
    """Half the visual tokens kept across tiles, at their original positions."""
    image, question = noise(57, 40, seed=3), QUESTIONS[2]
    stats = check_pruned_exact(pair.root / "draft-fp32", edge.address, pair.model, inputs_for(pair), image, question)
    assert stats.kept_visual_tokens == image_token_count(40, 57, load_manifest(pair.root / "draft-fp32").image) // 2


def test_device_run_without_torch(pair, edge, tmp_path, no_torch):
    image = noise(100, 31, seed=9)
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
                                image_sizes=inputs["image_sizes"]).logits
            second = target_probs(logits[0, -1].numpy(), temperature, top_k)
            for t2 in np.nonzero(second)[0]:
                joint[(int(t1), int(t2))] = first[t1] * second[t2]
    return joint


@pytest.mark.parametrize("wire", ["compact", "dense"])
def test_sampling_follows_target_distribution(pair, edge, wire):
    """The first two committed tokens (the second from a draft with fewer vocabulary rows,
    verified) follow the target's p."""
    image, question = noise(50, 47, seed=5), QUESTIONS[0]
    temperature, top_k, runs = 1.5, 4, 600
    joint = target_joint(pair, image, question, temperature, top_k)
    check_sampling_follows(joint, pair.root / "draft-fp32", edge.address, image, question, temperature, top_k, runs, wire)


def test_three_turn_conversations_are_exact(pair, edge):
    """Each turn's answer is the target's own answer to the whole conversation, device-led and edge-led."""
    check_conversation_exact(pair.root / "self-fp32", edge.address, pair.model, pair.processor, noise(57, 40), max_new_tokens=10)
