"""Sliding-window language models (Mistral's every-layer window, Qwen2's
``use_sliding_window`` on some layers): the exported decoder applies the window as the
model does, and the edge rolls its cache back past the window. Contexts here are about
three times the window, so every check runs beyond it."""

from __future__ import annotations

import pytest
from family_checks import co_generate, noise, png, reference

from covspec.export.pipeline import ExportOptions, export_model
from covspec.families import family_for_folder
from covspec.hf.tiny import save_tiny_llava
from covspec.runtime_device.options import GenerationSettings
from covspec.runtime_edge import EdgeServer, ServerConfig

WINDOW = 8
QUESTION = "what color is the circle ?"


@pytest.mark.parametrize("language", ["mistral", "qwen2"])
def test_sliding_window_models_are_exported_and_served_exactly(tmp_path, language):
    folder = save_tiny_llava(tmp_path / "model", seed=3, language=language, sliding_window=WINDOW, text_layers=3)
    # Parity (fp32 logits within 1e-4 of PyTorch over a context longer than the window) is
    # part of every export: it fails if the exported mask ignores the window.
    report = export_model(folder, tmp_path / "self", ExportOptions(quant="fp32")).manifest["parity"]["fp32"]
    assert report["positions"] > 2 * WINDOW and report["max_abs_diff_logits"] <= 1e-4
    family = family_for_folder(folder)
    model, processor = family.load(folder)
    target = family.target(model, processor)
    drafted = accepted = 0
    with EdgeServer(folder, ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        for seed, size in enumerate([(57, 40), (33, 90)]):
            image = noise(*size, seed=seed)
            tokens, stats = co_generate(tmp_path / "self", server.address, png(image), QUESTION,
                                        GenerationSettings(max_new_tokens=16))
            assert tokens == reference(model, target.context(QUESTION, image).inputs, 16)
            drafted, accepted = drafted + stats.drafted, accepted + sum(stats.accepted)
    assert accepted == drafted > 0          # the target as its own draft: every token accepted
