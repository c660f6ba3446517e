"""The edge processes a conversation's image once (``runtime_edge/processed_images.py``).

A follow-up question about the image a session holds gets the very same decoded image
(``turns.turn_image``) and, through ``RememberedImages``, the pixels processed for the
first question: the same context as processing them again, an entry that goes when the
image goes, and copies a processor may pop from without touching what is remembered.
"""

from __future__ import annotations

import gc
import io

import numpy as np
import torch
from PIL import Image

from covspec.bench.harness.workload import toy_questions
from covspec.protocol.messages import Open
from covspec.runtime_edge.processed_images import RememberedImages
from covspec.runtime_edge.target import TargetModel
from covspec.runtime_edge.turns import turn_image
from covspec.toy.models import bundled_model_dir


def decoded(index: int) -> Image.Image:
    return Image.open(io.BytesIO(toy_questions(index + 1)[index].image_png)).convert("RGB")


def test_the_same_image_is_processed_once_and_gives_the_same_context():
    target = TargetModel.load(bundled_model_dir("target"))
    remembered = target.processor.image_processor
    assert isinstance(remembered, RememberedImages)
    image = decoded(0)
    first = target.context("what is in the picture ?", image)
    again = target.context("what color is the square ?", image)                    # a follow-up: a hit
    assert remembered.hits == 1
    fresh = target.context("what color is the square ?", decoded(0))                # equal pixels, another object
    assert remembered.hits == 1
    for name in fresh.inputs:
        assert torch.equal(again.inputs[name], fresh.inputs[name]), name
    assert torch.equal(first.inputs["pixel_values"], again.inputs["pixel_values"])


def test_an_entry_goes_with_its_image_and_hands_out_copies():
    target = TargetModel.load(bundled_model_dir("target"))
    remembered = target.processor.image_processor
    image = decoded(1)
    output = remembered(image, return_tensors="pt")
    output.pop("pixel_values")                                     # a processor popping from what it got
    assert "pixel_values" in remembered(image, return_tensors="pt") and remembered.hits == 1
    remembered(image, return_tensors="np")                         # other options: processed again
    assert remembered.hits == 1
    assert len(remembered.outputs) == 1                            # the newest entry for this image
    del image, output
    gc.collect()
    assert remembered.outputs == {}


def test_a_follow_up_without_image_bytes_reuses_the_session_image():
    class Held:                                                    # the session of the last turn
        image, picture = b"png bytes", decoded(2)

    follow_up = Open(session="s", seq=2, image=np.zeros(0, np.uint8), prompt="q", committed=np.zeros(0, np.int32))
    data, picture = turn_image(follow_up, Held, decode=lambda data: None)
    assert data == Held.image and picture is Held.picture
    first = Open(session="s", seq=1, image=np.frombuffer(b"other bytes", np.uint8), prompt="q",
                 committed=np.zeros(0, np.int32))
    assert turn_image(first, Held, decode=lambda data: ("decoded", data)) == (b"other bytes", ("decoded", b"other bytes"))
