"""The device bench's Idefics3 / SmolVLM side, in small: ``build_model`` builds a
``SizeConfig`` of the idefics3 family with exactly the requested dimensions, the
language model folder (onnxruntime-genai's input) is the VLM's own language model, and
the probe measures the exported artifact.

The real size is ``covspec bench device --config smolvlm-256m``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from covspec.bench.device import probe as device_probe
from covspec.bench.device.anchor import language_model_folder
from covspec.bench.device.size import CONFIGS, SizeConfig, build_model
from covspec.export.pipeline import ExportOptions, export_model

VISION = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 3,
          "image_size": 32, "patch_size": 8}
TEXT = {"vocab_size": 160, "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 50000.0,
        "tie_word_embeddings": True}
TINY = SizeConfig("tiny-smolvlm", "tiny", VISION, "llama", TEXT, family="idefics3",
                  options={"scale_factor": 2, "longest_edge": 64, "tile": 32, "smolvlm": True})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(TINY, tmp_path_factory.mktemp("smolvlm") / "model")


def test_the_model_has_exactly_the_requested_dimensions(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["SmolVLMForConditionalGeneration"] and config["scale_factor"] == 2
    assert {key: config["vision_config"][key] for key in VISION} == VISION
    text = config["text_config"]
    exact = [key for key in TEXT if key not in ("vocab_size", "rope_theta")]
    assert {key: text[key] for key in exact} == {key: TEXT[key] for key in exact}
    assert text["rope_parameters"]["rope_theta"] == TEXT["rope_theta"] and config["tie_word_embeddings"]
    assert abs(text["vocab_size"] - TEXT["vocab_size"]) <= 8            # the word tokenizer's, about the size asked
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["image_seq_len"] == (32 // 8) ** 2 // 2 ** 2
    assert processor["image_processor"]["size"] == {"longest_edge": 64}
    assert processor["image_processor"]["max_image_size"] == {"longest_edge": 32}


def test_the_real_configs_are_buildable_in_their_family():
    smolvlm = CONFIGS["smolvlm-256m"]
    assert smolvlm.family == "idefics3" and smolvlm.vision["image_size"] == smolvlm.options["tile"]
    assert smolvlm.options["longest_edge"] % smolvlm.options["tile"] == 0
    tokens = (smolvlm.vision["image_size"] // smolvlm.vision["patch_size"]) ** 2 // smolvlm.options["scale_factor"] ** 2
    assert tokens == 64
    with pytest.raises(ValueError, match="no builder"):
        build_model(SizeConfig("x", "x", VISION, "llama", TEXT, family="paligemma"), "unused")


def test_the_language_model_folder_is_the_vlms_language_model(folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    lm = AutoModelForCausalLM.from_pretrained(language_model_folder(folder, tmp_path / "lm")).eval()
    vlm = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(lm).__name__ == "LlamaForCausalLM" and (tmp_path / "lm" / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 17, 42, 99, 5, 63]])
    with torch.no_grad():
        expected = vlm(input_ids=ids).logits[0, -1]
        got = lm(input_ids=ids).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-5) and expected.abs().max() > 0


def test_the_probe_measures_an_exported_idefics3(folder, tmp_path):
    artifact = tmp_path / "draft-int8"
    export_model(folder, artifact, ExportOptions(quant="int8", min_agreement=0.0, quantize_vision="always"))
    result = device_probe.probe(artifact, threads=1, contexts=(16, 40), synthetic_visual=32, decode_tokens=2,
                                copying=False)
    # 640 x 480 -> 64 x 48 -> tiles of 32: 2 x 2 tiles + the global image, 4 tokens each.
    assert result["visual_tokens"] == 5 * 4 and result["vision_s"] > 0
    assert result["prefill_s"]["0.25"]["rows"] < result["prefill_s"]["1.0"]["rows"]
    assert set(result["decode"]) == {"16", "40"} and np.isfinite(result["decode"]["40"]["ms"])
