"""A lean artifact (``covspec device run --memory lean``, the default there) opens each graph
when first needed and never holds the vision graph and the decoder together; it answers
exactly as a resident one, image after image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from covspec.export.pipeline import ExportOptions, export_model
from covspec.hf.tiny import save_tiny_llava
from covspec.runtime_device.artifact import DraftArtifact, Graph
from covspec.runtime_device.client import EdgeClient, Backoff
from covspec.runtime_device.engine import CoInference
from covspec.protocol.heap import release_heap
from covspec.runtime_device.memory import peak_rss_mb, rss_mb
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.stats import GenerationStats
from covspec.runtime_edge import EdgeServer, ServerConfig


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    save_tiny_llava(root / "draft", seed=0)
    save_tiny_llava(root / "target", seed=1, text_hidden=64)
    export_model(root / "draft", root / "artifact", ExportOptions(quant="fp32"))
    with EdgeServer(root / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield root / "artifact", server.address


def answers(artifact: DraftArtifact, address: str, watch=lambda: None, abandoned: list | None = None) -> list[list[int]]:
    """Three answers (device-led, edge-led, device-led); ``abandoned`` collects whether each
    generation's draft prefill was given up (edge-led: the answer came before the draft)."""
    client = EdgeClient(address, Backoff(timeout_s=5))
    out = []
    try:
        engine = CoInference(artifact, client)
        for seed, lead in ((0, "device"), (1, "edge"), (2, "device")):
            options = DraftingOptions(lead=lead, policy="fixed", draft_len=3)
            tokens, stats = [], GenerationStats()
            for chunk in engine.generate(png(seed), "what color is the circle ?", GenerationSettings(max_new_tokens=12),
                                         options, stats):
                tokens += chunk
                watch()
            out.append(tokens)
            if abandoned is not None:
                abandoned.append(stats.prefill_abandoned)
    finally:
        client.close()
    return out


def test_a_lean_artifact_opens_graphs_when_needed_and_answers_as_a_resident_one(pair, monkeypatch):
    folder, address = pair
    lean = DraftArtifact.load(folder, lean=True)
    assert not any(graph.is_open for graph in (lean.vision, lean.scorer, lean.decoder))
    opened, real_open = [], Graph.open

    def open_and_record(graph):
        if not graph.is_open:
            opened.append((graph.path.stem, lean.vision.is_open, lean.decoder.is_open))
        return real_open(graph)

    monkeypatch.setattr(Graph, "open", open_and_record)
    together, abandoned = [], []
    got = answers(lean, address, watch=lambda: together.append(lean.vision.is_open and lean.decoder.is_open),
                  abandoned=abandoned)
    assert together and not any(together)             # never both while tokens streamed
    # once per image, vision first; an edge-led answer that came before its draft was ready
    # abandons the prefill, and the decoder may not have opened then
    names = " ".join(name for name, _, _ in opened if name != "scorer")
    expected = [{"vision decoder"} if not gave_up else {"vision", "vision decoder"} for gave_up in abandoned]
    parts = names.replace("vision", "|vision").split("|")[1:]
    assert len(parts) == 3 and all(part.strip() in allowed for part, allowed in zip(parts, expected)), names
    assert all(not decoder for name, _, decoder in opened if name == "vision")
    assert all(not vision for name, vision, _ in opened if name == "decoder")
    assert lean.decoder.is_open and not lean.vision.is_open
    lean.encode_image(lean.family.vision_inputs(Image.open(io.BytesIO(png(3)))))
    assert not lean.vision.is_open and not lean.decoder.is_open      # the next image closed the decoder first
    resident = DraftArtifact.load(folder)
    assert all(graph.is_open for graph in (resident.vision, resident.scorer, resident.decoder))
    assert got == answers(resident, address)
    assert resident.vision.is_open and resident.decoder.is_open


def test_memory_figures_are_real():
    before = rss_mb()
    block = np.ones(64 * 2 ** 20 // 8)             # 64 MiB, touched
    assert rss_mb() - before > 48 and peak_rss_mb() >= rss_mb()
    del block
    release_heap()
    assert rss_mb() - before < 32


def test_the_bench_runs_covspec_device_run_lean_and_resident(pair, tmp_path):
    from covspec.bench.device.run import MEMORY_MODES, device_run

    artifact, _ = pair
    result = device_run(artifact.parent / "draft", artifact, tmp_path, max_new_tokens=6, log=lambda line: None)
    assert result["same_answer"]
    for mode in MEMORY_MODES:
        assert result[mode]["tokens"] == 6 and result[mode]["peak_rss_mb"] > 50
