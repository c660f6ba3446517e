"""One way to fill the prompt: ``fill_prompt`` (``covspec/families/common.py``) puts the
question into the template on the device, the edge and the exporter of every family, so
draft and target tokenize the same text, also for a question with surrounding spaces and
a template with literal braces (which ``str.format`` would refuse or mangle)."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

import covspec
from covspec.families import family_for_folder
from covspec.families.common import QUESTION_SLOT, fill_prompt
from covspec.hf.tiny import save_tiny_llava
from covspec.hf.tiny_gemma3 import save_tiny_gemma3
from covspec.hf.tiny_idefics3 import save_tiny_idefics3
from covspec.hf.tiny_onevision import save_tiny_onevision
from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl

SAVERS = {"llava": save_tiny_llava, "onevision": save_tiny_onevision, "idefics3": save_tiny_idefics3,
          "qwen2vl": save_tiny_qwen2vl, "gemma3": save_tiny_gemma3}
QUESTIONS = ["  what color is the circle ?  ", "\tis there a { red } square ?\n", "how many shapes are there ?"]


def test_fill_prompt_strips_the_question_and_leaves_other_braces_alone():
    template = "<s> user : {json: {\"a\": 1}} <image> {question} } assistant :"
    assert fill_prompt(template, "  is it {red} ?\n") == "<s> user : {json: {\"a\": 1}} <image> is it {red} ? } assistant :"
    assert fill_prompt("{question}", "\t q \n") == "q"
    with pytest.raises((KeyError, ValueError, IndexError)):
        template.format(question="q")          # why not str.format: a literal brace breaks it


def test_no_module_fills_the_template_its_own_way():
    """Outside ``families/common.py`` nothing names the ``{question}`` slot in code or calls
    ``.format(question=...)``: every half goes through ``fill_prompt``."""
    root = pathlib.Path(covspec.__file__).parent
    own_way = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "families" / "common.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\.format\(question=|\.replace\(\s*\"\{question\}\"", code):
                own_way.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not own_way, "\n".join(own_way)


@pytest.fixture(scope="module", params=sorted(SAVERS))
def halves(request, tmp_path_factory):
    """One tiny model folder of the family: its edge half and its device half (built from the
    manifest sections its export half writes)."""
    folder = SAVERS[request.param](tmp_path_factory.mktemp(request.param) / "tiny")
    family = family_for_folder(folder)
    model, processor = family.load(folder)
    export = family.exporter(model, processor)
    tokenizer_file = folder / "tokenizer.json"

    def device(template: str):
        return family.device(image=export.image_section(), tokenizer_section=export.tokenizer_section(tokenizer_file),
                             prompt_template=template, tokenizer=Tokenizer.from_file(str(tokenizer_file)),
                             embed_tokens=export.embed_tokens())

    return request.param, model, family.target(model, processor), export, device


@pytest.mark.parametrize("braces", [False, True], ids=["model template", "template with braces"])
def test_device_and_edge_fill_the_same_prompt(halves, braces):
    """The edge's context (image tokens left out) is the device's prompt layout (its text
    segments joined), for questions with surrounding whitespace and braces, with the model's
    template and with one that holds literal braces."""
    name, model, target, export, device = halves
    template = model_template = target.template
    if braces:
        template = template.replace(QUESTION_SLOT, "{ " + QUESTION_SLOT + " } {}")
        target.template = template
    try:
        half = device(template)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8))
        feeds = half.vision_inputs(image)
        for question in QUESTIONS:
            ids = target.context(question, image).inputs["input_ids"][0].tolist()
            text = [i for i in ids if i != model.config.image_token_id]
            layout = half.prompt_layout(question, feeds)
            assert [i for segment in layout.segments for i in segment] == text, (name, question)
            assert len(layout.segments) >= 2 and len(text) < len(ids), name
            if not braces:     # the exporter's parity inputs: the model's own template (Gemma 3: its chat)
                exported = export.processor_inputs(image, question)["input_ids"][0].tolist()
                assert [i for i in exported if i != model.config.image_token_id] == text, (name, question)
    finally:
        target.template = model_template
