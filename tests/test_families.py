"""Model families: the registry, and the LLaVA family's halves against the model's own
processor (non-square images, prompt layout and positions), with torch blocked for
the device half."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from covspec.families import (FAMILIES, DraftContext, ModelFolderError, UnsupportedModelError,
                              family_for_architecture, family_for_folder, family_named, register)
from covspec.families.common import fill_prompt
from covspec.families.llava import LLAVA
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol.errors import BAD_FIELD, EdgeError
from covspec.protocol.manifest import ArtifactError

REPO = Path(__file__).resolve().parents[1]
QUESTION = "what color is the circle ?"
NON_SQUARE = [(57, 40), (33, 90), (100, 31)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LLaVA (48x48 input, patch 8: 36 visual tokens), its export half and its device half
    built from the manifest sections the export half writes."""
    folder = save_tiny_llava(tmp_path_factory.mktemp("families") / "tiny", image_size=48)
    family = family_for_folder(folder)
    model, processor = family.load(folder)
    half = family.exporter(model, processor)
    table = half.embed_tokens()
    device = family.device(image=half.image_section(), tokenizer_section=half.tokenizer_section(folder / "tokenizer.json"),
                           prompt_template=half.template, tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
                           embed_tokens=table)
    return SimpleNamespace(folder=folder, model=model, processor=processor, half=half, device=device, table=table)


# --- the registry ---------------------------------------------------------------------------

def test_registry_names_the_supported_architectures(tmp_path):
    assert family_for_architecture("LlavaForConditionalGeneration") is LLAVA
    assert family_named("llava") is LLAVA and FAMILIES["llava"] is LLAVA
    with pytest.raises(UnsupportedModelError, match="'GPT2LMHeadModel' is not supported; supported: "
                                                    "LlavaForConditionalGeneration"):
        family_for_architecture("GPT2LMHeadModel")
    with pytest.raises(UnsupportedModelError, match="'qwen9' is not known.*known: llava"):
        family_named("qwen9")

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelFolderError, match="gpt2: architecture 'GPT2LMHeadModel'.*LlavaForConditionalGeneration"):
        family_for_folder(folder)
    with pytest.raises(ModelFolderError, match="no config.json"):
        family_for_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="not a folder"):
        family_for_folder(tmp_path / "missing")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(ModelFolderError, match="no weights"):
        family_for_folder(folder)


def test_register_refuses_a_taken_name_or_architecture():
    before = dict(FAMILIES)
    clash = SimpleNamespace(name="other", architectures=("LlavaForConditionalGeneration",))
    with pytest.raises(ValueError, match="already registered"):
        register(clash)
    with pytest.raises(ValueError, match="already registered"):
        register(SimpleNamespace(name="llava", architectures=("NewArchitecture",)))
    assert FAMILIES == before and {"llava", "onevision"} <= set(FAMILIES)
    assert family_for_architecture("LlavaOnevisionForConditionalGeneration") is family_named("onevision")


HOOKS = ("pack_visual_tokens", "vision_runs", "next_position", "dynamic_resolution")


def test_every_family_is_one_lazy_family_whose_halves_implement_the_interface():
    """The shims share ``LazyFamily``; each half it names subclasses its protocol, so the
    optional hooks are inherited members with their documented defaults."""
    import importlib

    from covspec.families.common import LazyFamily, ProcessorTarget
    from covspec.families.interface import DeviceHalf

    for family in FAMILIES.values():
        assert isinstance(family, LazyFamily) and family.halves.keys() == {"device", "load", "target", "export"}
        named = {role: getattr(importlib.import_module(spec.partition(":")[0]), spec.partition(":")[2])
                 for role, spec in family.halves.items()}
        assert DeviceHalf in named["device"].__mro__ and ProcessorTarget in named["target"].__mro__, family.name
        assert callable(named["load"]) and isinstance(named["export"], type), family.name
    assert [f.name for f in FAMILIES.values() if f.dynamic_resolution] == ["qwen2vl"]


def test_optional_hooks_have_their_documented_defaults_and_no_one_asks_for_them():
    from covspec.families.interface import DeviceHalf, ImageSizeError, TargetHalf

    class Bare(DeviceHalf):
        pass

    class BareTarget(TargetHalf):
        pass

    features, activity = np.arange(12.0).reshape(1, 3, 4), np.arange(3.0).reshape(1, 3)
    packed = Bare().pack_visual_tokens({}, features, activity)
    np.testing.assert_array_equal(packed[0], features[0])
    np.testing.assert_array_equal(packed[1], activity[0])
    feeds = {"pixel_values": np.zeros((2, 3, 8, 8), np.float32)}
    assert Bare().vision_runs(feeds) == [feeds]
    assert BareTarget().next_position(None) is None
    with pytest.raises(ImageSizeError, match="fixed vision input size"):
        LLAVA.exporter(None, None, image_size=(32, 32))
    asked = [f"{path.relative_to(REPO)}: {line.strip()}" for path in sorted((REPO / "covspec").rglob("*.py"))
             for line in path.read_text().splitlines()
             if ("getattr(" in line or "hasattr(" in line) and any(f'"{hook}"' in line for hook in HOOKS)]
    assert not asked, asked


def test_export_half_refuses_unsupported_sub_models():
    config = SimpleNamespace(text_config=SimpleNamespace(model_type="gpt2"),
                             vision_config=SimpleNamespace(model_type="clip_vision_model"))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; supported: llama, mistral, qwen2"):
        LLAVA.exporter(SimpleNamespace(config=config), processor=None)


# --- the device half against the model's processor ---------------------------------------------

@pytest.mark.parametrize("size", NON_SQUARE)
def test_device_preprocessing_equals_the_processor_on_non_square_images(llava, size):
    image = noise(*size, seed=sum(size))
    expected = llava.processor.image_processor(images=image, return_tensors="np")["pixel_values"]
    got = llava.device.vision_inputs(image)["pixel_values"]
    assert got.shape == expected.shape == (1, 3, 48, 48) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5


def test_device_prompt_layout_and_positions_equal_the_processor(llava):
    """Keep ratio 1: the draft context is the processor's prompt (image token expanded)
    at positions 0..L-1, and generation continues at L."""
    image = noise(57, 40)
    ids = llava.processor(images=image, text=fill_prompt(llava.half.template, QUESTION),
                          return_tensors="np")["input_ids"][0].tolist()
    image_token = llava.model.config.image_token_id
    layout = llava.device.prompt_layout(QUESTION)
    n = ids.count(image_token)
    before, after = layout.segments
    assert n == 36 and list(before) + [image_token] * n + list(after) == ids

    features = np.random.default_rng(1).standard_normal((n, llava.table.shape[1])).astype(np.float32)
    for positions in ("original", "contiguous"):
        context = llava.device.draft_context(layout, features, np.arange(n), positions)
        assert isinstance(context, DraftContext) and len(context) == len(ids)
        np.testing.assert_array_equal(context.positions, np.arange(len(ids)))
        assert context.next_position == len(ids)
        expected = llava.table[ids]
        expected[len(before):len(before) + n] = features
        np.testing.assert_array_equal(context.embeds, expected)


def test_pruned_draft_context_keeps_original_positions_or_renumbers(llava):
    layout = llava.device.prompt_layout(QUESTION)
    before, after = (len(segment) for segment in layout.segments)
    features = np.random.default_rng(2).standard_normal((36, llava.table.shape[1])).astype(np.float32)
    kept = np.array([0, 5, 6, 35])
    original = llava.device.draft_context(layout, features, kept, "original")
    np.testing.assert_array_equal(original.positions[before:before + 4], before + kept)
    np.testing.assert_array_equal(original.positions[before + 4:], before + 36 + np.arange(after))
    assert original.next_position == before + 36 + after
    np.testing.assert_array_equal(original.embeds[before:before + 4], features[kept])
    contiguous = llava.device.draft_context(layout, features, kept, "contiguous")
    np.testing.assert_array_equal(contiguous.positions, np.arange(before + 4 + after))
    assert contiguous.next_position == before + 4 + after
    with pytest.raises(ValueError, match="positions"):
        llava.device.draft_context(layout, features, kept, "rope3d")


def test_device_half_names_a_missing_image_field(llava):
    image = llava.half.image_section()
    del image["crop_size"]
    with pytest.raises(ArtifactError, match="'image.crop_size'"):
        LLAVA.device(image=image, tokenizer_section={"image_token_id": 4}, prompt_template="",
                     tokenizer=None, embed_tokens=llava.table)


# --- the edge half -------------------------------------------------------------------------------

def test_target_context_equals_the_processor_and_refuses_the_image_placeholder(llava):
    target = LLAVA.target(llava.model, llava.processor)
    image = noise(33, 90)
    context = target.context(QUESTION, image)
    expected = llava.processor(images=image, text=fill_prompt(target.template, QUESTION), return_tensors="pt")
    assert torch.equal(context.inputs["input_ids"], expected["input_ids"])
    assert torch.equal(context.inputs["pixel_values"], expected["pixel_values"])
    assert context.length == expected["input_ids"].shape[1] and context.keep is None
    pruned = target.context(QUESTION, image, keep=[3, 1, 3])
    assert pruned.length == context.length - 36 + 2 and pruned.keep.tolist() == [1, 3]
    assert target.pruned_inputs(pruned)["inputs_embeds"].shape[:2] == (1, pruned.length)
    for question, keep in ((f"{llava.processor.image_token} {QUESTION}", None), (QUESTION, [36])):
        with pytest.raises(EdgeError) as refused:
            target.context(question, image, keep=keep)
        assert refused.value.code == BAD_FIELD
    assert target.eos_ids() == {2}


# --- the device half without torch -----------------------------------------------------------

NO_TORCH = r"""
import importlib.abc
import sys


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: the device half must not import it")
        return None


sys.meta_path.insert(0, BlockTorch())
import numpy as np
from PIL import Image

import covspec.families
from covspec.families import family_named
from covspec.families.llava.device import LlavaDevice
from covspec.hf.folder import build_word_tokenizer

image = {"size": [32, 32], "resize_shortest_edge": 32, "crop_size": [32, 32], "do_center_crop": True,
         "rescale_factor": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bicubic",
         "do_convert_rgb": True}
tokenizer = build_word_tokenizer(["what", "color", "question", ":", "answer"])
device = family_named("llava").device(image=image, tokenizer_section={"image_token_id": 4},
                                      prompt_template="<s> question : <image> {question} answer :",
                                      tokenizer=tokenizer, embed_tokens=np.zeros((10, 8), np.float32))
assert isinstance(device, LlavaDevice)
pixels = device.vision_inputs(Image.new("RGB", (57, 40), (200, 10, 30)))["pixel_values"]
layout = device.prompt_layout("what color")
context = device.draft_context(layout, np.ones((16, 8), np.float32), np.arange(16), "original")
print(pixels.shape, len(context), sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
"""


def test_device_half_imports_and_runs_without_torch():
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 3, 32, 32) 23 []"   # context: 3 text + 16 visual + 4 text


def test_export_help_names_the_supported_classes():
    from click.testing import CliRunner

    from covspec.cli.main import cli

    result = CliRunner().invoke(cli, ["export", "--help"])
    assert result.exit_code == 0
    for family in FAMILIES.values():
        for architecture in family.architectures:
            assert architecture in result.output
