"""Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``): image splitting into tiles
plus a global image, the pixel-shuffle connector, row/column tokens in the prompt.

Preprocessing and prompt ids against the model's own ``Idefics3Processor`` on
non-square images (split and unsplit), pruning across tiles, the edge's context,
fp32 and int8 export with parity, self-draft acceptance, greedy exactness against
``generate()`` and ``device run`` with torch blocked. ``SmolVLMProcessor`` needs
``num2words`` (not installed here): its image processor and prompt expansion are
Idefics3's, so the processor side is tested through ``Idefics3Processor``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from covspec.export.pipeline import ExportOptions, export_model
from covspec.families.common import fill_prompt
from covspec.families import family_for_folder, family_named
from covspec.families.idefics3 import IDEFICS3
from covspec.protocol.errors import BAD_FIELD, EdgeError
from covspec.protocol.manifest import ArtifactError, load_manifest
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_device.prefill import prefill_draft
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.hf.tiny_idefics3 import save_tiny_idefics3
from family_checks import (check_conversation_exact, QUESTIONS, SELF_DRAFT, SIZES, acceptance, check_greedy_exact, check_int8_export,
                           co_generate, device_run_without_torch, noise, png, pruned_options, reference)

# Tiles of 32 px, patch 8, pixel shuffle 2: 4 tokens per frame; images resized to a
# longest edge of 96 px: up to 3 x 3 tiles + the global image (40 visual tokens).
NON_SQUARE = [((57, 40), (3, 3)), ((33, 90), (3, 2)), ((100, 31), (1, 3)), ((300, 50), (1, 3))]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A draft and a larger target; the draft in fp32 and int8, the target as its own draft."""
    root = tmp_path_factory.mktemp("idefics3")
    save_tiny_idefics3(root / "draft", seed=0)
    save_tiny_idefics3(root / "target", seed=1, text_hidden=64, vision_layers=3)
    export_model(root / "draft", root / "draft-fp32", ExportOptions(quant="fp32"))
    export_model(root / "draft", root / "draft-int8", ExportOptions(quant="int8", min_agreement=0.0))
    export_model(root / "target", root / "self-fp32", ExportOptions(quant="fp32"))
    model, processor = IDEFICS3.load(root / "target")
    return SimpleNamespace(root=root, model=model, processor=processor, target=IDEFICS3.target(model, processor))


@pytest.fixture(scope="module")
def edge(pair):
    with EdgeServer(pair.root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


def device_half(pair, artifact: str = "self-fp32", **image_changes):
    manifest = load_manifest(pair.root / artifact)
    return IDEFICS3.device(image={**manifest.image, **image_changes}, tokenizer_section=manifest.tokenizer,
                           prompt_template=manifest.prompt_template,
                           tokenizer=Tokenizer.from_file(str(pair.root / artifact / "tokenizer.json")),
                           embed_tokens=np.load(pair.root / artifact / "embed_tokens.npy"))


def target_inputs(pair):
    return lambda image, question: pair.target.context(question, image).inputs


def prompt_ids(layout, seq: int, image_token: int) -> list[int]:
    """The layout's prompt with every image slot filled by ``seq`` image tokens."""
    ids = []
    for i, segment in enumerate(layout.segments):
        ids += list(segment) + ([image_token] * seq if i < len(layout.segments) - 1 else [])
    return ids


# --- the device half against the processor -----------------------------------------------------

@pytest.mark.parametrize("size, grid", NON_SQUARE)
def test_preprocessing_and_prompt_ids_equal_the_processor(pair, size, grid):
    device = device_half(pair)
    image = noise(*size, seed=sum(size))
    feeds = device.vision_inputs(image)
    expected = pair.processor(images=image, text=fill_prompt(pair.target.template, QUESTIONS[0]),
                              return_tensors="np")
    rows, cols = grid
    assert feeds["pixel_values"].shape == expected["pixel_values"][0].shape == (rows * cols + 1, 3, 32, 32)
    assert np.abs(feeds["pixel_values"] - expected["pixel_values"][0]).max() <= 1e-5
    assert feeds["image_grid"].tolist() == [rows, cols]
    layout = device.prompt_layout(QUESTIONS[0], feeds)         # the grid comes with the feeds
    assert len(layout.segments) == rows * cols + 2                    # one slot per tile + the global image
    assert prompt_ids(layout, 4, pair.model.config.image_token_id) == expected["input_ids"][0].tolist()


@pytest.mark.parametrize("changes, kwargs", [({"do_image_splitting": False}, {"do_image_splitting": False}),
                                             ({"longest_edge": 32}, {"size": {"longest_edge": 32}})])
def test_an_unsplit_image_is_one_global_frame(pair, changes, kwargs):
    device = device_half(pair, **changes)
    image = noise(70, 45, seed=3)
    feeds = device.vision_inputs(image)
    expected = pair.processor(images=image, text=fill_prompt(pair.target.template, QUESTIONS[1]),
                              return_tensors="np", **kwargs)
    assert feeds["pixel_values"].shape == (1, 3, 32, 32) and feeds["image_grid"].tolist() == [0, 0]
    assert np.abs(feeds["pixel_values"] - expected["pixel_values"][0]).max() <= 1e-5
    assert prompt_ids(device.prompt_layout(QUESTIONS[1], feeds), 4, pair.model.config.image_token_id) == \
        expected["input_ids"][0].tolist()


def test_pruning_across_tiles_keeps_original_positions(pair):
    """Kept visual tokens from several tiles and the global image keep their prompt
    positions; the text between tiles (row/column tokens, newlines) is always kept."""
    device = device_half(pair)
    layout = device.prompt_layout(QUESTIONS[0], grid=(1, 3))           # 3 tiles + global: 16 visual tokens
    ids = np.array(prompt_ids(layout, 4, pair.model.config.image_token_id))
    visual_at = np.flatnonzero(ids == pair.model.config.image_token_id)
    features = np.random.default_rng(0).standard_normal((16, device.embed_tokens.shape[1])).astype(np.float32)
    full = device.draft_context(layout, features, np.arange(16), "original")
    np.testing.assert_array_equal(full.positions, np.arange(len(ids)))
    np.testing.assert_array_equal(full.embeds[visual_at], features)
    kept = np.array([1, 6, 7, 13])                                     # tiles 1, 2 (twice) and the global image
    context = device.draft_context(layout, features, kept, "original")
    text = np.flatnonzero(ids != pair.model.config.image_token_id)
    expected_positions = np.sort(np.concatenate([text, visual_at[kept]]))
    np.testing.assert_array_equal(context.positions, expected_positions)
    assert context.next_position == len(ids) and len(context) == len(text) + 4
    np.testing.assert_array_equal(context.embeds[np.isin(expected_positions, visual_at)], features[kept])
    np.testing.assert_array_equal(context.embeds[np.isin(expected_positions, text)], device.embed_tokens[ids[text]])
    contiguous = device.draft_context(layout, features, kept, "contiguous")
    np.testing.assert_array_equal(contiguous.positions, np.arange(len(context)))
    with pytest.raises(ArtifactError, match="different images"):
        device.draft_context(layout, features[:12], np.arange(12), "original")
    with pytest.raises(ArtifactError, match="image"):
        device.prompt_layout("<image> what")


# --- the edge half -----------------------------------------------------------------------------

def test_target_context_and_pruned_inputs(pair):
    image = noise(33, 90, seed=4)
    context = pair.target.context(QUESTIONS[2], image)
    expected = pair.processor(images=image, text=fill_prompt(pair.target.template, QUESTIONS[2]),
                              return_tensors="pt")
    assert torch.equal(context.inputs["input_ids"], expected["input_ids"])
    assert torch.equal(context.inputs["pixel_values"], expected["pixel_values"])
    everything = pair.target.context(QUESTIONS[2], image, keep=range(28))    # 3 x 2 tiles + global: 28 tokens
    with torch.no_grad():
        full = pair.model(**context.inputs).logits[0, -1]
        kept_all = pair.model(**pair.target.pruned_inputs(everything)).logits[0, -1]
    assert everything.length == context.length and torch.allclose(full, kept_all, atol=1e-5)
    pruned = pair.target.context(QUESTIONS[2], image, keep=[27, 0, 5, 5])
    assert pruned.length == context.length - 28 + 3 and pruned.keep.tolist() == [0, 5, 27]
    assert pair.target.pruned_inputs(pruned)["inputs_embeds"].shape[:2] == (1, pruned.length)
    for question, keep in ((f"<image> {QUESTIONS[2]}", None), (QUESTIONS[2], [28])):
        with pytest.raises(EdgeError) as refused:
            pair.target.context(question, image, keep=keep)
        assert refused.value.code == BAD_FIELD


# --- export, self-draft, exactness -------------------------------------------------------------

def test_export_records_parity_and_the_tiling(pair):
    assert family_for_folder(pair.root / "draft") is IDEFICS3 is family_named("idefics3")
    fp32 = load_manifest(pair.root / "draft-fp32")
    assert fp32.source["family"] == "idefics3" and fp32.source["architecture"] == "Idefics3ForConditionalGeneration"
    report = fp32.parity["fp32"]
    assert report["max_abs_diff_logits"] <= 1e-4 and report["max_abs_diff_image_features"] <= 1e-4
    assert report["greedy_match_tokens"] == report["greedy_tokens"] == 16
    assert fp32.num_visual_tokens == 40                                  # a square image: 3 x 3 tiles + global
    assert {"tile": 32, "longest_edge": 96, "do_image_splitting": True, "image_seq_len": 4}.items() <= \
        fp32.image.items()
    check_int8_export(pair.root)


def test_self_draft_is_accepted_and_exact(pair, edge):
    """The target exported as its own draft (fp32, keep ratio 1, fixed length 4)."""
    stats = check_greedy_exact(pair.root / "self-fp32", edge.address, pair.model, target_inputs(pair))
    assert acceptance(stats) >= 0.95


@pytest.mark.parametrize("artifact", ["draft-fp32", "draft-int8"])
def test_greedy_output_equals_target_generate(pair, edge, artifact):
    check_greedy_exact(pair.root / artifact, edge.address, pair.model, target_inputs(pair))


def test_pruned_draft_stays_exact_and_pruned_target_is_opt_in(pair, edge):
    image, question = noise(57, 40, seed=2), QUESTIONS[0]
    expected = reference(pair.model, target_inputs(pair)(image, question), 16)
    half = pruned_options(3)
    tokens, stats = co_generate(pair.root / "draft-fp32", edge.address, png(image), question,
                                GenerationSettings(max_new_tokens=16), half)
    assert tokens == expected and stats.kept_visual_tokens == 20
    pruned, _ = co_generate(pair.root / "self-fp32", edge.address, png(image), question,
                            GenerationSettings(max_new_tokens=16, prune_target=True), SELF_DRAFT)
    assert pruned == expected                                           # keeping every token, it is exact

    # Keeping half: the target's own greedy answer over the kept tokens (of every tile) only.
    artifact = DraftArtifact.load(pair.root / "draft-fp32")
    kept = prefill_draft(artifact, Drafter.from_artifact(artifact), image, question, half, seed=0).kept
    pruned, _ = co_generate(artifact, edge.address, png(image), question,
                            GenerationSettings(max_new_tokens=16, prune_target=True), half)
    inputs = pair.target.pruned_inputs(pair.target.context(question, image, keep=kept))
    with torch.no_grad():
        own = pair.model.generate(**inputs, max_new_tokens=16, do_sample=False)[0].tolist()
    assert len(kept) == 20 and len(np.unique(kept // 4)) >= 3 and pruned == own   # kept across several frames
    assert pruned != expected                                           # the target really saw fewer tokens


def test_device_cli_runs_without_torch(pair, edge, tmp_path, no_torch):
    image, question = noise(*SIZES[1], seed=11), QUESTIONS[4]
    report = device_run_without_torch(no_torch, pair.root / "draft-int8", edge.address, tmp_path, image, question, 16)
    assert report["token_ids"] == reference(pair.model, target_inputs(pair)(image, question), 16)


def test_smolvlm_model_loads_exports_and_drafts_for_itself(tmp_path):
    """``SmolVLMForConditionalGeneration`` with its processor files as a SmolVLM checkpoint
    names them (loaded through ``Idefics3Processor``): parity, self-draft, exactness."""
    folder = save_tiny_idefics3(tmp_path / "smolvlm", seed=2, smolvlm=True)
    model, processor = family_for_folder(folder).load(folder)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "SmolVLMImageProcessorPil"
    manifest = export_model(folder, tmp_path / "self-fp32", ExportOptions(quant="fp32")).manifest
    assert manifest["source"]["architecture"] == "SmolVLMForConditionalGeneration"
    assert manifest["parity"]["fp32"]["max_abs_diff_logits"] <= 1e-4
    target = IDEFICS3.target(model, processor)
    with EdgeServer(folder, ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        stats = check_greedy_exact(tmp_path / "self-fp32", server.address, model,
                                   lambda image, question: target.context(question, image).inputs, max_new_tokens=12)
    assert sum(stats.accepted) / stats.drafted >= 0.95


def test_the_vision_graph_runs_a_few_frames_at_a_time_and_equals_one_run(pair):
    from covspec.families.idefics3.device import FRAMES_PER_RUN
    from PIL import Image

    from covspec.runtime_device.artifact import run_vision

    artifact = DraftArtifact.load(pair.root / "draft-fp32")
    feeds = artifact.family.vision_inputs(Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 90, 3),
                                                                                            dtype=np.uint8)))
    frames = feeds["pixel_values"].shape[0]
    runs = artifact.family.vision_runs(feeds)
    assert frames > FRAMES_PER_RUN and len(runs) == -(-frames // FRAMES_PER_RUN)
    whole, split = run_vision(artifact.vision, feeds), artifact.encode_image(feeds)
    for one, parts in zip(whole, split):
        assert one.shape == parts.shape
        np.testing.assert_allclose(parts, one, atol=1e-5)


def test_three_turn_conversations_are_exact(pair, edge):
    """Each turn's answer is the target's own answer to the whole conversation, device-led and edge-led."""
    check_conversation_exact(pair.root / "self-fp32", edge.address, pair.model, pair.processor, noise(57, 40), max_new_tokens=10)
