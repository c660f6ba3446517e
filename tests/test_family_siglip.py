"""LLaVA with a SigLIP tower and a Qwen2 language model (llava-interleave-qwen's shape):
a fixed square resize without a crop, no CLS token ("full" selection, feature norm as
activity). Preprocessing and prompt ids against the model's own processor on
non-square images, fp32 and int8 export with parity, self-draft acceptance, greedy
exactness against ``generate()``, ``device run`` with torch blocked, and a
preprocessing that does not match the vision graph refused with a clear error."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from covspec.cli.main import cli
from covspec.export.pipeline import ExportOptions, export_model
from covspec.families.common import fill_prompt
from covspec.families import family_for_folder
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol.manifest import ArtifactError, load_manifest
from covspec.runtime_device.artifact import DraftArtifact, run_vision
from covspec.runtime_edge import EdgeServer, ServerConfig
from family_checks import (check_conversation_exact, QUESTIONS, SIZES, check_greedy_exact, device_run_without_torch, noise, png,
                                 reference)

SIGLIP = {"tower": "siglip", "language": "qwen2", "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A SigLIP/Qwen2 draft and a larger target; the draft in fp32 and int8, the target as its own draft."""
    root = tmp_path_factory.mktemp("siglip")
    save_tiny_llava(root / "draft", seed=0, **SIGLIP)
    save_tiny_llava(root / "target", seed=1, text_hidden=64, vision_layers=3, **SIGLIP)
    export_model(root / "draft", root / "draft-fp32", ExportOptions(quant="fp32"))
    export_model(root / "draft", root / "draft-int8", ExportOptions(quant="int8", min_agreement=0.0))
    export_model(root / "target", root / "self-fp32", ExportOptions(quant="fp32"))
    model, processor = family_for_folder(root / "target").load(root / "target")
    return SimpleNamespace(root=root, model=model, processor=processor)


@pytest.fixture(scope="module")
def edge(pair):
    with EdgeServer(pair.root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


def target_inputs(pair):
    """The model's own processor on an image and a question (the reference's inputs)."""
    template = load_manifest(pair.root / "self-fp32").prompt_template
    return lambda image, question: dict(pair.processor(images=image, text=fill_prompt(template, question),
                                                       return_tensors="pt"))


def test_manifest_records_the_siglip_processor(pair):
    manifest = load_manifest(pair.root / "draft-fp32")
    assert manifest.image["resize"] == {"height": 32, "width": 32}
    assert manifest.image["do_center_crop"] is False and manifest.image["crop_size"] is None
    assert manifest.source["vision_model_type"] == "siglip_vision_model" and manifest.num_visual_tokens == 16
    assert manifest.parity["fp32"]["max_abs_diff_logits"] <= 1e-4
    assert manifest.parity["fp32"]["greedy_match_tokens"] == manifest.parity["fp32"]["greedy_tokens"]
    int8 = load_manifest(pair.root / "draft-int8")
    assert int8.quantization["scheme"] == "int8" and int8.parity["int8"]["positions"] >= 64


@pytest.mark.parametrize("size", SIZES[:4])
def test_device_preprocessing_and_prompt_equal_the_processor(pair, size):
    artifact = DraftArtifact.load(pair.root / "self-fp32")
    image = noise(*size, seed=sum(size))
    expected = pair.processor(images=image, text=fill_prompt(artifact.manifest.prompt_template, QUESTIONS[0]),
                              return_tensors="np")
    got = artifact.family.vision_inputs(image)["pixel_values"]
    assert got.shape == expected["pixel_values"].shape == (1, 3, 32, 32)
    assert np.abs(got - expected["pixel_values"]).max() <= 1e-5
    layout = artifact.family.prompt_layout(QUESTIONS[0])
    before, after = layout.segments
    assert list(before) + [pair.model.config.image_token_id] * 16 + list(after) == expected["input_ids"][0].tolist()


def test_activity_is_the_feature_norm(pair):
    artifact = DraftArtifact.load(pair.root / "draft-fp32")
    features, activity = run_vision(artifact.vision, artifact.family.vision_inputs(noise(57, 40)))
    np.testing.assert_allclose(activity[0], np.linalg.norm(features[0], axis=-1), rtol=1e-5)


def test_self_draft_acceptance_and_greedy_exactness(pair, edge):
    stats = check_greedy_exact(pair.root / "self-fp32", edge.address, pair.model, target_inputs(pair))
    assert stats.drafted > 0 and sum(stats.accepted) >= 0.95 * stats.drafted
    check_greedy_exact(pair.root / "draft-int8", edge.address, pair.model, target_inputs(pair))


def test_device_run_without_torch(pair, edge, tmp_path, no_torch):
    image = noise(90, 33, seed=7)
    report = device_run_without_torch(no_torch, pair.root / "draft-int8", edge.address, tmp_path, image,
                                      QUESTIONS[1], 16)
    assert report["token_ids"] == reference(pair.model, target_inputs(pair)(image, QUESTIONS[1]), 16)


def test_a_preprocessing_that_does_not_match_the_graph_is_a_clear_error(pair, edge, tmp_path):
    """The manifest of the bug (a shortest-edge resize for a SigLIP processor): `device run`
    says what is wrong instead of an onnxruntime traceback; so does a graph fed the wrong shape."""
    broken = tmp_path / "broken"
    shutil.copytree(pair.root / "draft-fp32", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["image"]["resize"] = {"shortest_edge": 32}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    image = tmp_path / "wide.png"
    image.write_bytes(png(noise(76, 32)))
    # device-led: the draft must run before a token past the first is committed (edge-led, the edge
    # may finish a 4-token answer before the device's prefill fails, and the run ends well)
    result = CliRunner().invoke(cli, ["device", "run", "--artifacts", str(broken), "--edge", edge.address,
                                      "--image", str(image), "--prompt", QUESTIONS[0], "--max-new-tokens", "4",
                                      "--lead", "device"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "76x32 image into 76x32 pixels, but the vision tower takes 32x32" in result.output

    artifact = DraftArtifact.load(pair.root / "draft-fp32")
    with pytest.raises(ArtifactError, match=r"pixel_values of shape \[1, 3, 32, 76\], but the vision graph "
                                            r"takes \[batch, 3, 32, 32\]"):
        run_vision(artifact.vision, {"pixel_values": np.zeros((1, 3, 32, 76), np.float32)})
    with pytest.raises(ArtifactError, match="produced no 'pixel_values'"):
        run_vision(artifact.vision, {"pixels": np.zeros((1, 3, 32, 32), np.float32)})


def test_three_turn_conversations_are_exact(pair, edge):
    """Each turn's answer is the target's own answer to the whole conversation, device-led and edge-led."""
    check_conversation_exact(pair.root / "self-fp32", edge.address, pair.model, pair.processor, noise(57, 40), max_new_tokens=10)
