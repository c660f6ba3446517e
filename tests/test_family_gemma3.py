"""Gemma 3 (``Gemma3ForConditionalGeneration``): a fixed-size SigLIP tower pooled to
``mm_tokens_per_image`` tokens, image tokens that attend to each other bidirectionally
inside the language model, sliding-window layers interleaved with global ones, scaled
embeddings, and one BOS under the chat template.

The tiny models slide over 24 tokens while prompts are about 35 tokens long, so every
check below runs past the window. The reference is the model card's way: the
processor's ``apply_chat_template`` and ``generate()``. Preprocessing and prompt ids
on non-square images, the bidirectional mask (the exported decoder equals the model
with it and differs without it), the edge's context, rollback past the window and
pruned inputs, fp32 and int8 export with parity, self-draft acceptance, greedy
exactness (also with half the visual tokens kept) and ``device run`` with torch blocked.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from covspec.export.pipeline import ExportOptions, export_model
from covspec.families import family_for_folder, family_named
from covspec.families.gemma3 import GEMMA3
from covspec.hf.tiny_gemma3 import save_tiny_gemma3
from covspec.protocol.errors import BAD_FIELD, EdgeError
from covspec.protocol.manifest import ArtifactError, load_manifest
from covspec.protocol.verification import target_probs
from covspec.runtime_device.artifact import DraftArtifact, open_graph
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_device.prefill import prefill_draft
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.runtime_edge.target import TargetModel
from family_checks import (check_conversation_exact, QUESTIONS, SELF_DRAFT, SIZES, acceptance, check_greedy_exact, check_int8_export,
                           check_sampling_follows, co_generate, device_run_without_torch, noise, png,
                           pruned_options, reference)

TOKENS = 16          # visual tokens per image: 32 px, patch 4 -> 8 x 8 patches, pooled 2 x 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A draft and a larger target (4 layers, two of them global); the draft in fp32 and
    int8, the target as its own draft."""
    root = tmp_path_factory.mktemp("gemma3")
    save_tiny_gemma3(root / "draft", seed=0)
    save_tiny_gemma3(root / "target", seed=1, text_hidden=64, text_layers=4, vision_layers=3)
    export_model(root / "draft", root / "draft-fp32", ExportOptions(quant="fp32"))
    export_model(root / "draft", root / "draft-int8", ExportOptions(quant="int8", min_agreement=0.0))
    export_model(root / "target", root / "self-fp32", ExportOptions(quant="fp32"))
    model, processor = GEMMA3.load(root / "target")
    return SimpleNamespace(root=root, model=model, processor=processor, target=GEMMA3.target(model, processor))


@pytest.fixture(scope="module")
def edge(pair):
    with EdgeServer(pair.root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


def chat_inputs(processor, image, question: str) -> dict:
    """The model card's way: the processor's chat template on one image and the question."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return dict(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt"))


def target_inputs(pair):
    return lambda image, question: chat_inputs(pair.processor, image, question)


def device_half(pair, artifact: str = "self-fp32"):
    manifest = load_manifest(pair.root / artifact)
    return GEMMA3.device(image=manifest.image, tokenizer_section=manifest.tokenizer,
                         prompt_template=manifest.prompt_template,
                         tokenizer=Tokenizer.from_file(str(pair.root / artifact / "tokenizer.json")),
                         embed_tokens=np.load(pair.root / artifact / "embed_tokens.npy"))


def prompt_ids(layout, image_token: int) -> list[int]:
    before, after = layout.segments
    return list(before) + [image_token] * TOKENS + list(after)


# --- the device half against the processor -----------------------------------------------------

@pytest.mark.parametrize("size", SIZES[:4] + [(300, 50)])
def test_preprocessing_and_prompt_ids_equal_the_processor(pair, size):
    device = device_half(pair)
    image = noise(*size, seed=sum(size))
    expected = chat_inputs(pair.processor, image, QUESTIONS[0])
    feeds = device.vision_inputs(image)
    assert feeds["pixel_values"].shape == expected["pixel_values"].shape == (1, 3, 32, 32)
    assert np.abs(feeds["pixel_values"] - expected["pixel_values"].numpy()).max() <= 1e-5
    layout = device.prompt_layout(QUESTIONS[0], feeds)
    ids = prompt_ids(layout, pair.model.config.image_token_id)
    assert ids == expected["input_ids"][0].tolist() and ids.count(pair.processor.tokenizer.bos_token_id) == 1  # one BOS
    assert ids == pair.target.context(QUESTIONS[0], image).inputs["input_ids"][0].tolist()
    features = np.zeros((TOKENS, device.embed_tokens.shape[1]), np.float32)
    context = device.draft_context(layout, features, np.arange(TOKENS), "original")
    np.testing.assert_array_equal(context.image_groups, expected["token_type_ids"][0].numpy())
    text = context.image_groups == 0                                                    # scaled embeddings
    with torch.no_grad():
        scaled = pair.model.get_input_embeddings()(expected["input_ids"])[0].numpy()
    np.testing.assert_allclose(context.embeds[text], scaled[text], atol=1e-6)


def test_pruned_context_keeps_positions_and_its_image_group(pair):
    device = device_half(pair)
    layout = device.prompt_layout(QUESTIONS[1])
    before = len(layout.segments[0])
    features = np.random.default_rng(0).standard_normal((TOKENS, device.embed_tokens.shape[1])).astype(np.float32)
    kept = np.array([0, 5, 6, 15])
    context = device.draft_context(layout, features, kept, "original")
    visual = context.image_groups == 1
    np.testing.assert_array_equal(context.positions[visual], before + kept)
    np.testing.assert_array_equal(context.embeds[visual], features[kept])
    assert context.next_position == before + TOKENS + len(layout.segments[1]) and visual.sum() == 4
    contiguous = device.draft_context(layout, features, kept, "contiguous")
    np.testing.assert_array_equal(contiguous.positions, np.arange(len(contiguous)))
    np.testing.assert_array_equal(contiguous.image_groups, context.image_groups)
    with pytest.raises(ArtifactError, match="another model"):
        device.draft_context(layout, features[:12], np.arange(12), "original")
    with pytest.raises(ArtifactError, match="start_of_image"):
        device.prompt_layout("<start_of_image> what")


def test_the_bidirectional_image_mask_matters(pair):
    """The exported decoder's prefill equals the model with the processor's
    ``token_type_ids`` (image tokens see each other); fed no image groups (a purely
    causal mask) it equals the model without them, and differs from the real one."""
    image, question = noise(57, 40, seed=5), QUESTIONS[2]
    inputs = chat_inputs(pair.processor, image, question)
    artifact = DraftArtifact.load(pair.root / "self-fp32")
    drafter = Drafter.from_artifact(artifact)
    assert drafter.takes_image_groups
    layout = artifact.family.prompt_layout(question)
    visual = artifact.vision.run(["image_features"], artifact.family.vision_inputs(image))[0][0]
    context = artifact.family.draft_context(layout, visual, np.arange(TOKENS), "original")
    with torch.no_grad():
        bidirectional = pair.model(**inputs).logits[0].numpy()
        causal = pair.model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0].numpy()
    ours = drafter.prefill_rows(context)
    assert np.abs(ours - bidirectional).max() <= 1e-4
    after_image = slice(len(layout.segments[0]), None)
    assert np.abs(causal[after_image] - bidirectional[after_image]).max() > 1e-2
    plain = drafter.prefill_rows(type(context)(context.embeds, context.positions, context.next_position))
    assert np.abs(plain - causal).max() <= 1e-4


# --- the edge half -----------------------------------------------------------------------------

def test_target_context_rollback_past_the_window_and_pruned_inputs(pair):
    image = noise(33, 90, seed=4)
    context = pair.target.context(QUESTIONS[2], image)
    expected = chat_inputs(pair.processor, image, QUESTIONS[2])
    assert torch.equal(context.inputs["input_ids"], expected["input_ids"])
    assert torch.equal(context.inputs["token_type_ids"], expected["token_type_ids"])
    model, window = pair.model, pair.model.config.text_config.sliding_window
    assert context.length > window                                      # the prompt alone passes the window
    with torch.no_grad():
        out = model(**context.inputs, use_cache=True)
        cache, tokens = out.cache, [7, 30, 41, 12, 55, 9]
        first = model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True).logits[0]
        cache.crop(-4)                                                  # roll back past the window
        again = model(input_ids=torch.tensor([tokens[2:]]), cache=cache, use_cache=True).logits[0]
        generated = model.generate(**expected, max_new_tokens=12, do_sample=False)
    assert torch.allclose(first[2:], again, atol=1e-5)
    target = TargetModel(model, pair.processor, "cpu")
    with torch.inference_mode():
        cache, logits = target.prefill(pair.target.context(QUESTIONS[2], image))
        step = generated[0, expected["input_ids"].shape[1]:].tolist()
        assert int(np.argmax(logits)) == step[0]
        assert np.argmax(target.extend(cache, step[:-1]), axis=-1).tolist() == step[1:]

    everything = pair.target.context(QUESTIONS[2], image, keep=range(TOKENS))
    with torch.no_grad():
        kept_all = model(**pair.target.pruned_inputs(everything)).logits[0, -1]
        full = model(**expected).logits[0, -1]
    assert everything.length == context.length and torch.allclose(full, kept_all, atol=1e-5)
    pruned = pair.target.context(QUESTIONS[2], image, keep=[15, 0, 5, 5])
    assert pruned.length == context.length - TOKENS + 3 and pruned.keep.tolist() == [0, 5, 15]
    assert pair.target.pruned_inputs(pruned)["token_type_ids"].sum() == 3
    for question, keep in ((f"<start_of_image> {QUESTIONS[2]}", None), (QUESTIONS[2], [TOKENS])):
        with pytest.raises(EdgeError) as refused:
            pair.target.context(question, image, keep=keep)
        assert refused.value.code == BAD_FIELD


# --- export, self-draft, exactness -------------------------------------------------------------

def test_export_records_parity_and_the_image_sequence(pair):
    assert family_for_folder(pair.root / "draft") is GEMMA3 is family_named("gemma3")
    fp32 = load_manifest(pair.root / "draft-fp32")
    assert fp32.source["family"] == "gemma3" and fp32.source["sliding_window"] == 24
    report = fp32.parity["fp32"]
    assert report["max_abs_diff_logits"] <= 1e-4 and report["max_abs_diff_image_features"] <= 1e-4
    assert report["greedy_match_tokens"] == report["greedy_tokens"] == 16
    assert fp32.num_visual_tokens == TOKENS and fp32.image["image_seq_len"] == TOKENS
    assert fp32.image["image_text_before"] == "\n\n<start_of_image>"
    assert fp32.image["image_text_after"] == "<end_of_image>\n\n"
    assert "image_groups" in fp32.graphs["decoder"]["inputs"]
    assert open_graph(pair.root / "draft-fp32" / "decoder.onnx").get_inputs()[3].name == "image_groups"
    check_int8_export(pair.root)


def test_self_draft_is_accepted_and_exact(pair, edge):
    """The target exported as its own draft (fp32, keep ratio 1, fixed length 4)."""
    stats = check_greedy_exact(pair.root / "self-fp32", edge.address, pair.model, target_inputs(pair))
    assert acceptance(stats) >= 0.95


@pytest.mark.parametrize("artifact", ["draft-fp32", "draft-int8"])
def test_greedy_output_equals_target_generate(pair, edge, artifact):
    check_greedy_exact(pair.root / artifact, edge.address, pair.model, target_inputs(pair))


def test_pruned_draft_stays_exact_and_pruned_target_is_opt_in(pair, edge):
    """Half the visual tokens kept: the kept ones form the draft's image group; the output
    is still the target's own. The pruned target (opt-in) keeps its kept tokens bidirectional."""
    image, question = noise(57, 40, seed=2), QUESTIONS[0]
    expected = reference(pair.model, target_inputs(pair)(image, question), 16)
    half = pruned_options(3)
    for artifact in ("draft-fp32", "self-fp32"):
        tokens, stats = co_generate(pair.root / artifact, edge.address, png(image), question,
                                    GenerationSettings(max_new_tokens=16), half)
        assert tokens == expected and stats.kept_visual_tokens == TOKENS // 2
    pruned, _ = co_generate(pair.root / "self-fp32", edge.address, png(image), question,
                            GenerationSettings(max_new_tokens=16, prune_target=True), SELF_DRAFT)
    assert pruned == expected                                           # keeping every token, it is exact

    artifact = DraftArtifact.load(pair.root / "draft-fp32")
    kept = prefill_draft(artifact, Drafter.from_artifact(artifact), image, question, half, seed=0).kept
    pruned, _ = co_generate(artifact, edge.address, png(image), question,
                            GenerationSettings(max_new_tokens=16, prune_target=True), half)
    with torch.no_grad():   # ``generate`` takes no inputs_embeds for Gemma 3: greedy by hand, with the cache
        inputs = pair.target.pruned_inputs(pair.target.context(question, image, keep=kept))
        out = pair.model(**inputs, use_cache=True)
        own = [int(out.logits[0, -1].argmax())]
        while len(own) < 16:
            out = pair.model(input_ids=torch.tensor([own[-1:]]), cache=out.cache, use_cache=True)
            own.append(int(out.logits[0, -1].argmax()))
    assert len(kept) == TOKENS // 2 and pruned == own
    assert pruned != expected                                           # the target really saw fewer tokens


def test_device_cli_runs_without_torch(pair, edge, tmp_path, no_torch):
    image, question = noise(*SIZES[1], seed=11), QUESTIONS[4]
    report = device_run_without_torch(no_torch, pair.root / "draft-int8", edge.address, tmp_path, image, question, 16)
    assert report["token_ids"] == reference(pair.model, target_inputs(pair)(image, question), 16)


def test_sampling_follows_target_distribution(pair, edge):
    """The first two committed tokens (the second drafted by the smaller draft past the
    window, then verified) follow the target's p, computed with the model's own mask."""
    image, question = noise(50, 47, seed=5), QUESTIONS[0]
    temperature, top_k, runs = 1.5, 4, 400
    inputs = chat_inputs(pair.processor, image, question)
    with torch.no_grad():
        first = target_probs(pair.model(**inputs).logits[0, -1].numpy(), temperature, top_k)
        joint = {}
        for t1 in np.nonzero(first)[0]:
            longer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([[t1]])], dim=1),
                      "token_type_ids": torch.cat([inputs["token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1),
                      "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
            second = target_probs(pair.model(**longer).logits[0, -1].numpy(), temperature, top_k)
            joint.update({(int(t1), int(t2)): first[t1] * second[t2] for t2 in np.nonzero(second)[0]})
    check_sampling_follows(joint, pair.root / "draft-fp32", edge.address, image, question, temperature, top_k, runs)


def test_three_turn_conversations_are_exact(pair, edge):
    """Each turn's answer is the target's own answer to the whole conversation, device-led and edge-led."""
    check_conversation_exact(pair.root / "self-fp32", edge.address, pair.model, pair.processor, noise(57, 40), max_new_tokens=10)
