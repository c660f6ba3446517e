"""The checks every model family passes end to end (ARCHITECTURE.md, "Model families"), shared by the
per-family test modules: non-square test images, a co-inference run against a real
edge, greedy exactness against the target's own ``generate()``, self-draft
acceptance, and ``covspec device run`` with torch blocked.

Every check whose claim is about drafts runs device-led (``SELF_DRAFT``,
``pruned_options``) and asserts that something was drafted: greedy exactness of the
device-led runs, the pruned draft, acceptance, and sampling (every run's second token
was drafted and verified). A default that stopped the device from drafting would
otherwise leave checks that cannot fail."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import chisquare

from covspec.families import family_for_model
from covspec.protocol.manifest import load_manifest
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, Backoff
from covspec.runtime_device.conversation import Conversation
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.stats import GenerationStats

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?",
             "what is the color of the square ?", "are there many shapes ?"]
# (width, height): landscape, portrait, near square, very wide.
SIZES = [(57, 40), (33, 90), (50, 47), (100, 31), (41, 64)]
SELF_DRAFT = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0, keep_ratio=1.0)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def co_generate(artifact, address: str, image: bytes, question: str, settings: GenerationSettings,
                options: DraftingOptions = SELF_DRAFT) -> tuple[list[int], GenerationStats]:
    """One generation through ``CoInference`` with ``artifact`` (a folder or a loaded artifact)."""
    artifact = artifact if isinstance(artifact, DraftArtifact) else DraftArtifact.load(artifact)
    client = EdgeClient(address, Backoff(timeout_s=10))
    stats = GenerationStats()
    try:
        tokens = [t for chunk in CoInference(artifact, client).generate(image, question, settings, options, stats)
                  for t in chunk]
    finally:
        client.close()
    return tokens, stats


def reference(model, inputs: dict, max_new_tokens: int) -> list[int]:
    """The target's own greedy ``generate()`` on processed ``inputs``."""
    import torch

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def check_greedy_exact(artifact, address: str, model, inputs_for: Callable[[Image.Image, str], dict],
                       max_new_tokens: int = 20, options: DraftingOptions = SELF_DRAFT) -> GenerationStats:
    """Greedy co-inference equals ``generate()`` token for token on five prompts (one per
    non-square size), device-led with ``options`` and edge-led; returns the summed
    statistics (drafted, accepted) of the device-led runs."""
    artifact = DraftArtifact.load(artifact)
    total = GenerationStats()
    for seed, (question, size) in enumerate(zip(QUESTIONS, SIZES)):
        image = noise(*size, seed=seed)
        tokens, stats = co_generate(artifact, address, png(image), question,
                                    GenerationSettings(max_new_tokens=max_new_tokens), options)
        expected = reference(model, inputs_for(image, question), max_new_tokens)
        assert tokens == expected, (question, size)
        assert stats.drafted > 0, ("nothing drafted", question, size)
        total.drafted += stats.drafted
        total.accepted += stats.accepted
        edge_led, _ = co_generate(artifact, address, png(image), question,
                                  GenerationSettings(max_new_tokens=max_new_tokens), replace(options, lead="edge"))
        assert edge_led == expected, ("edge-led", question, size)
    return total


def check_conversation_exact(artifact, address: str, model, processor, image: Image.Image,
                             max_new_tokens: int = 12) -> None:
    """Three-turn conversations about ``image``, device-led and edge-led: every answer equals the
    target's own greedy ``generate()`` on the whole conversation (the family's chat template
    applied to the history: ``target.turns``, checked against ``apply_chat_template`` by
    ``tests/test_conversation.py``), and the follow-ups travel without the image."""
    artifact = DraftArtifact.load(artifact)
    target = family_for_model(model).target(model, processor)
    for options in (SELF_DRAFT, replace(SELF_DRAFT, lead="edge")):
        client = EdgeClient(address, Backoff(timeout_s=10))
        try:
            with Conversation(CoInference(artifact, client), png(image), GenerationSettings(max_new_tokens=max_new_tokens),
                              options) as chat:
                for number, question in enumerate(QUESTIONS[:3]):
                    context = target.context(question, image, template=target.turns.template(chat.history))
                    inputs = {k: v for k, v in context.inputs.items() if k != "cache"}
                    stats = GenerationStats()
                    list(chat.ask(question, stats=stats))
                    assert chat.last_tokens == reference(model, inputs, max_new_tokens), (options.lead, number)
                    assert number == 0 or stats.bytes_up < len(png(image)), "a follow-up carried the image"
        finally:
            client.close()


def acceptance(stats: GenerationStats) -> float:
    """The share of drafted tokens the target accepted (some must have been drafted)."""
    assert stats.drafted > 0
    return sum(stats.accepted) / stats.drafted


def pruned_options(draft_len: int) -> DraftingOptions:
    """Half the visual tokens kept, device-led at a fixed chunk length: the pruned-draft checks."""
    return DraftingOptions(lead="device", policy="fixed", draft_len=draft_len, pipeline=False, branches=0,
                           keep_ratio=0.5)


def check_pruned_exact(artifact, address: str, model, inputs_for: Callable[[Image.Image, str], dict],
                       image: Image.Image, question: str, draft_len: int = 4,
                       max_new_tokens: int = 16) -> GenerationStats:
    """A draft keeping half its visual tokens still gives ``generate()``'s answer; its statistics."""
    tokens, stats = co_generate(artifact, address, png(image), question,
                                GenerationSettings(max_new_tokens=max_new_tokens), pruned_options(draft_len))
    assert tokens == reference(model, inputs_for(image, question), max_new_tokens)
    assert stats.drafted > 0, "the pruned draft drafted nothing"
    return stats


def check_int8_export(root: Path) -> None:
    """The int8 draft's manifest records its quantized decoder and parity; the fp32 self-draft's parity holds."""
    int8 = load_manifest(root / "draft-int8")
    assert int8.quantization["scheme"] == "int8" and "decoder" in int8.quantization["graphs"]
    assert int8.parity["int8"]["positions"] >= 64 and 0 <= int8.parity["int8"]["top1_agreement"] <= 1
    assert load_manifest(root / "self-fp32").parity["fp32"]["max_abs_diff_logits"] <= 1e-4


def check_sampling_follows(joint: dict, artifact, address: str, image: Image.Image, question: str,
                           temperature: float, top_k: int, runs: int, wire: str = "compact") -> None:
    """The first two committed tokens of ``runs`` seeded co-inference runs follow ``joint``,
    the target's exact distribution {(t1, t2): probability} (chi-square, p > 1e-3), and
    never a pair the target cannot produce; the second token of every run was drafted and verified."""
    client = EdgeClient(address, Backoff(timeout_s=10))
    counts = Counter()
    undrafted = 0
    try:
        engine = CoInference(DraftArtifact.load(artifact), client)
        options = replace(SELF_DRAFT, wire=wire)
        for seed in range(runs):
            settings = GenerationSettings(max_new_tokens=2, temperature=temperature, top_k=top_k, seed=seed)
            stats = GenerationStats()
            counts[tuple(t for chunk in engine.generate(png(image), question, settings, options, stats)
                         for t in chunk)] += 1
            undrafted += stats.drafted == 0
    finally:
        client.close()
    assert undrafted == 0, f"{undrafted} of {runs} runs drafted nothing"
    assert set(counts) <= set(joint), "a pair with zero target probability was produced"
    cells = sorted(joint)
    observed = np.array([counts[c] for c in cells], dtype=float)
    expected = np.array([joint[c] for c in cells]) * runs
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


def device_run_without_torch(no_torch, artifact, address: str, tmp_path, image: Image.Image, question: str,
                             max_new_tokens: int) -> dict:
    """``covspec device run --json`` in a Python where torch cannot be imported."""
    file = tmp_path / "image.png"
    file.write_bytes(png(image))
    script = """
        import sys
        from covspec.cli.main import cli
        cli(sys.argv[1:])
    """
    result = no_torch(script, "device", "run", "--artifacts", str(artifact), "--edge", address, "--image", str(file),
                      "--prompt", question, "--max-new-tokens", str(max_new_tokens), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
