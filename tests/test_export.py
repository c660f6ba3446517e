"""`covspec export`: tiny random LLaVA -> artifacts, parity, manifest checks, CLI errors,
torch-free execution of the artifacts, and (when trained) the toy draft in int8/int4."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from covspec.cli.main import cli
from covspec.export import pipeline
from covspec.export.parity import GREEDY_TOKENS, ExportedDraft, ParityPrompt, default_prompt, sample_input
from covspec.export.pipeline import ExportOptions, export_model
from covspec.export.scorer import TokenScorer
from covspec.families import family_for_folder
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol.manifest import ArtifactError, Manifest, load_manifest, write_manifest
from covspec.runtime_device.artifact import DraftArtifact, open_graph

REPO = Path(__file__).resolve().parents[1]
TOY_DRAFT = REPO / "covspec" / "toy" / "models" / "draft"


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["export", *args], catch_exceptions=False)


def load_for_export(folder: Path):
    """(model, its family's export half) of a model folder."""
    family = family_for_folder(folder)
    model, processor = family.load(folder)
    return model, family.exporter(model, processor)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("model") / "tiny-llava")


@pytest.fixture(scope="module")
def fp32_artifact(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "tiny-fp32"
    result = run_cli(str(tiny), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "greedy 16/16 tokens equal to PyTorch" in result.output
    return out


@pytest.fixture(scope="module")
def int8_ort_artifact(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "tiny-int8"
    result = run_cli(str(tiny), "--out", str(out), "--quant", "int8", "--format", "ort")
    assert result.exit_code == 0, result.output
    return out


def test_fp32_export_passes_parity_and_manifest_validates(fp32_artifact, tiny):
    manifest = load_manifest(fp32_artifact)
    assert sorted(manifest.files) == ["decoder.onnx", "embed_tokens.npy", "scorer.onnx", "tokenizer.json",
                                      "vision.onnx"]
    parity = manifest.parity["fp32"]
    assert parity["max_abs_diff_logits"] <= 1e-4
    assert parity["greedy_match_tokens"] == parity["greedy_tokens"] >= 16
    assert manifest.quantization["scheme"] == "fp32" and manifest.graph_format == "onnx"
    assert manifest.num_visual_tokens == 16  # 32x32 image, patch 8, CLS dropped
    assert manifest.prompt_template.count("{question}") == 1 and "<image>" in manifest.prompt_template
    assert manifest.decoder["past_input_names"][:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert manifest.graphs["decoder"]["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert manifest.embedding["shape"] == list(np.load(fp32_artifact / "embed_tokens.npy").shape)
    assert manifest.image["size"] == [32, 32] and manifest.image["resample"] == "bicubic"
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    names = {i.name for i in open_graph(fp32_artifact / "decoder.onnx").get_inputs()}
    assert names == {"inputs_embeds", "attention_mask", "position_ids", *manifest.decoder["past_input_names"]}


def test_decoder_graph_is_dynamic_and_keeps_position_gaps(fp32_artifact, tiny):
    """Batch 3, past 5, query 4, positions with gaps (pruned visual tokens): ONNX == PyTorch."""
    _, half = load_for_export(tiny)
    spec = half.decoder_spec
    decoder = open_graph(fp32_artifact / "decoder.onnx")
    generator = torch.Generator().manual_seed(1)
    for batch, past, query in [(3, 5, 4), (1, 0, 6), (2, 9, 1)]:
        embeds = torch.randn(batch, query, spec.hidden_size, generator=generator)
        mask = torch.ones(batch, past + query, dtype=torch.int64)
        positions = (torch.arange(past, past + query) * 3 + 2).expand(batch, -1).contiguous()
        caches = [torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=generator)
                  for _ in range(2 * spec.num_layers)]
        with torch.no_grad():
            expected = half.decoder(embeds, mask, positions, *caches)
        names = ["inputs_embeds", "attention_mask", "position_ids", *spec.to_dict()["past_input_names"]]
        got = decoder.run(None, dict(zip(names, [t.numpy() for t in (embeds, mask, positions, *caches)])))
        assert got[1].shape == (batch, spec.num_kv_heads, past + query, spec.head_dim)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-5)


def test_int8_ort_export_quantizes_and_runs(int8_ort_artifact, fp32_artifact, tiny):
    manifest = load_manifest(int8_ort_artifact)
    report = manifest.parity["int8"]
    assert report["positions"] >= 64 and report["top1_agreement"] >= report["bound"] == 0.9
    assert set(report["candidates"]) == {"int8_blockwise", "int8_per_channel", "int8_per_tensor"}
    assert report["candidates"][report["variant"]] == max(report["candidates"].values())   # the best kept
    assert manifest.quantization["scheme"] == "int8" and "decoder" in manifest.quantization["graphs"]
    assert manifest.graph_format == "ort"
    assert {"vision.ort", "scorer.ort", "decoder.ort"} <= set(manifest.files)
    ops = {node.op_type for node in onnx.load(str(int8_ort_artifact / "decoder.onnx")).graph.node}
    variant = manifest.quantization["variant"]
    assert ("MatMulNBits" if variant == "blockwise" else "MatMulInteger") in ops
    fp32 = load_manifest(fp32_artifact)
    assert manifest.files["decoder.onnx"]["sha256"] != fp32.files["decoder.onnx"]["sha256"]
    assert manifest.graph_path(int8_ort_artifact, "decoder").name == "decoder.ort"
    # The .ort graphs (what the device runs) decode as their .onnx sources do.
    artifact = DraftArtifact.load(int8_ort_artifact)
    _, half = load_for_export(tiny)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8))
    sample = sample_input(half, ParityPrompt(image, "what color is the circle ?", "non-square noise"))
    runs = [ExportedDraft(int8_ort_artifact / f"vision.{suffix}", int8_ort_artifact / f"decoder.{suffix}",
                          manifest.decoder, artifact.family, artifact.embed_tokens, manifest.tokenizer["eos_ids"])
            .greedy(sample, 8) for suffix in ("ort", "onnx")]
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[0][1], runs[1][1], atol=1e-4)


def test_corrupted_or_incompatible_artifact_is_refused(fp32_artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fp32_artifact, broken)
    data = bytearray((broken / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (broken / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="decoder.onnx.*sha256"):
        load_manifest(broken)
    load_manifest(broken, verify_hashes=False)  # sizes still match

    (broken / "vision.onnx").unlink()
    with pytest.raises(ArtifactError, match="'vision.onnx'.*missing"):
        load_manifest(broken, verify_hashes=False)

    for field, value, message in [("format_version", 2, "format_version"), ("tokenizer", {"file": "x"}, "vocab_size")]:
        folder = tmp_path / field
        shutil.copytree(fp32_artifact, folder)
        data = json.loads((folder / "manifest.json").read_text())
        data[field] = value
        (folder / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=message):
            load_manifest(folder)
    folder = tmp_path / "escape"
    shutil.copytree(fp32_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"]["../outside"] = {"sha256": "0", "bytes": 0}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        load_manifest(folder)

    data = load_manifest(fp32_artifact).to_dict()
    del data["graphs"]
    with pytest.raises(ArtifactError, match="'graphs'"):
        Manifest.from_dict(data)


def test_write_manifest_round_trip(fp32_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_artifact, copy)
    manifest = load_manifest(copy)
    manifest.pruning = {"keep_ratio": 0.5}
    write_manifest(copy, manifest)
    assert load_manifest(copy).pruning == {"keep_ratio": 0.5}


def test_cli_errors(tiny, fp32_artifact, tmp_path):
    result = run_cli(str(tmp_path), "--out", str(tmp_path / "a"))
    assert result.exit_code == 2 and "not a model folder" in result.output

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    result = run_cli(str(other), "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "LlavaForConditionalGeneration" in result.output

    before = load_manifest(fp32_artifact).files
    result = run_cli(str(tiny), "--out", str(fp32_artifact))
    assert result.exit_code == 1 and "--force" in result.output
    assert load_manifest(fp32_artifact).files == before

    result = run_cli(str(tiny), "--out", str(tiny), "--force")  # not an artifact folder: never deleted
    assert result.exit_code == 1 and "not an artifact folder" in result.output
    assert (tiny / "config.json").is_file()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quantization_below_its_bound_fails(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.DEFAULT_MIN_AGREEMENT, "int4", 1.5)  # a bound no quantization can meet
    result = run_cli(str(tiny), "--out", str(tmp_path / "q"), "--quant", "int4")
    assert result.exit_code == 1 and "ParityError" in result.output and "bound 150%" in result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


CHILD = r"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import json
from pathlib import Path
import numpy as np
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.drafter import Drafter
folder, work, n, question = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass
artifact = DraftArtifact.load(folder)
inputs = np.load(work / "inputs.npz")
features, activity = artifact.vision.run(["image_features", "activity"], {"pixel_values": inputs["pixel_values"]})
relevance, score = artifact.scorer.run(None, {"image_features": features[0], "activity": activity[0],
                                              "question_embeds": artifact.embed(inputs["question_ids"])})
drafter = Drafter.from_artifact(artifact)
layout = artifact.family.prompt_layout(question)
logits = drafter.prefill(artifact.family.draft_context(layout, features[0], np.arange(features.shape[1]),
                                                       "original"))
tokens = []
while len(tokens) < n:  # greedy with min_new_tokens == max_new_tokens: EOS suppressed
    logits[sorted(artifact.eos_ids)] = -np.inf
    tokens.append(int(logits.argmax()))
    logits = drafter.feed(tokens[-1:])[-1]
np.savez(work / "outputs.npz", features=features, activity=activity, relevance=relevance, score=score,
         tokens=np.array(tokens))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m])))
"""


def test_artifacts_run_without_torch(fp32_artifact, tiny, tmp_path):
    model, half = load_for_export(tiny)
    prompt = default_prompt(half)
    sample = sample_input(half, prompt)
    input_ids, pixel_values = sample.inputs["input_ids"], sample.inputs["pixel_values"]
    question_ids = input_ids[0, -6:].numpy()
    np.savez(tmp_path / "inputs.npz", pixel_values=pixel_values.numpy(), question_ids=question_ids)
    done = subprocess.run([sys.executable, "-c", CHILD, str(fp32_artifact), str(tmp_path), str(GREEDY_TOKENS),
                           prompt.question], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    out = np.load(tmp_path / "outputs.npz")

    with torch.no_grad():
        features, activity = half.vision(pixel_values)
        reference = model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        question = model.get_input_embeddings()(torch.from_numpy(question_ids))
        relevance, score = TokenScorer()(features[0], activity[0], question)
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=False,
                                   attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS)
    np.testing.assert_allclose(out["features"][0], reference.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["activity"], activity.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["relevance"], relevance.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["score"], score.numpy(), rtol=1e-5, atol=1e-5)
    assert out["tokens"].tolist() == generated[0, input_ids.shape[1]:].tolist()


def test_generated_image_token_id_is_plain_text(fp32_artifact, tiny):
    """A continuation that contains the image token id is fed as text embeddings (only
    the prompt's image slots take image features), as PyTorch does when decoding."""
    model, half = load_for_export(tiny)
    artifact = DraftArtifact.load(fp32_artifact)
    runner = ExportedDraft(fp32_artifact / "vision.onnx", fp32_artifact / "decoder.onnx", artifact.manifest.decoder,
                           artifact.family, artifact.embed_tokens, artifact.manifest.tokenizer["eos_ids"])
    sample = sample_input(half, default_prompt(half))
    image_token = model.config.image_token_id
    continuation = [7, image_token, 9, image_token, 11]
    got = runner.teacher_forced(sample, continuation)                          # [tail + 5, V]

    ids = sample.inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.get_image_features(pixel_values=sample.inputs["pixel_values"]).pooler_output[0]
        embeds[ids == image_token] = features                                  # the one image: [N, D]
        text = model.get_input_embeddings()(torch.tensor([continuation[:-1]]))
        logits = model(inputs_embeds=torch.cat([embeds, text], dim=1)).logits[0].numpy()
    first = int((ids[0] == image_token).nonzero().max())
    assert got.shape[0] == ids.shape[1] - 1 - first + len(continuation)
    np.testing.assert_allclose(got, logits[first:], atol=1e-4)


def test_activity_is_cls_attention_of_the_last_used_layer(tiny):
    """The activity output equals the eager attention probabilities of the CLS query."""
    model, half = load_for_export(tiny)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = tower(pixel_values, output_attentions=True, return_dict=True).attentions
        _, activity = half.vision(pixel_values)
    expected = attentions[-1][:, :, 0, 1:].mean(dim=1)  # layer used by vision_feature_layer=-1
    torch.testing.assert_close(activity, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_scorer_graph_matches_pytorch(exporter, tmp_path):
    """Both exporters: dynamic N and M with named dims; ONNX == the PyTorch TokenScorer."""
    from covspec.export.graphs import export_scorer

    spec = export_scorer(16, tmp_path, 18, exporter)
    scorer = open_graph(tmp_path / spec["file"])
    assert [i.shape for i in scorer.get_inputs()] == [["tokens", 16], ["tokens"], ["question", 16]]
    generator = torch.Generator().manual_seed(0)
    for tokens, question in [(1, 1), (144, 7), (30, 40)]:
        features = torch.randn(tokens, 16, generator=generator)
        activity = torch.rand(tokens, generator=generator)
        question_embeds = torch.randn(question, 16, generator=generator)
        with torch.no_grad():
            relevance, score = TokenScorer()(features, activity, question_embeds)
        got = scorer.run(None, {"image_features": features.numpy(), "activity": activity.numpy(),
                                "question_embeds": question_embeds.numpy()})
        np.testing.assert_allclose(got[0], relevance.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[1], score.numpy(), rtol=1e-5, atol=1e-6)
        assert abs(float(got[0].sum()) - 1) < 1e-5


def save_siglip_qwen2_llava(path: Path) -> Path:
    """A tiny LLaVA with a SigLIP tower (no CLS: "full" selection, feature norm as
    activity), a Qwen2 language model and feature layer -2."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config
    from transformers import SiglipVisionConfig

    from covspec.hf.folder import SPECIAL_TOKENS, build_word_tokenizer, save_llava_folder
    from covspec.hf.tiny import BASE_WORDS

    tokenizer = build_word_tokenizer(BASE_WORDS)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="full", image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    save_llava_folder(model, tokenizer, path, image_size=32)
    processor = LlavaProcessor.from_pretrained(path)
    processor.num_additional_image_tokens = 0  # no CLS token to account for
    processor.save_pretrained(path)
    return path


def test_siglip_qwen2_llava_exports(tmp_path):
    model_dir = save_siglip_qwen2_llava(tmp_path / "siglip-qwen2")
    result = export_model(model_dir, tmp_path / "art", ExportOptions())
    manifest = load_manifest(result.folder)
    assert manifest.source["vision_model_type"] == "siglip_vision_model"
    assert manifest.source["text_model_type"] == "qwen2"
    assert manifest.num_visual_tokens == 16
    assert manifest.parity["fp32"]["greedy_match_tokens"] == 16
    model, _ = family_for_folder(model_dir).load(model_dir)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output[0]
    got, activity = DraftArtifact.load(result.folder).vision.run(["image_features", "activity"],
                                                                 {"pixel_values": pixel_values.numpy()})
    np.testing.assert_allclose(got[0], features.numpy(), atol=1e-5)
    np.testing.assert_allclose(activity[0], np.linalg.norm(got[0], axis=-1), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (TOY_DRAFT / "config.json").is_file(), reason="the toy draft is not trained yet")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_toy_draft_exports(quant, tmp_path):
    out = tmp_path / f"toy-draft-{quant}"
    result = run_cli(str(TOY_DRAFT), "--out", str(out), "--quant", quant)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.num_visual_tokens == 144
    assert manifest.parity["fp32"]["sample"].startswith("ShapesVQA")
    report = manifest.parity[quant]
    assert report["positions"] >= 64
    if quant == "int8":
        assert report["top1_agreement"] >= 0.90
