"""Device runtime end to end against a real edge: exactness, faults, no torch.

The runs whose claim is about drafts are device-led and assert that the device
drafted (greedy exactness per draft length, statistics, sampling, the wire modes),
so a default that stopped the device from drafting cannot make them pass vacuously."""

import io
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare

from covspec.export.pipeline import ExportOptions, export_model
from covspec.families.common import fill_prompt, prompt_template
from covspec.families.llava.edge import load_llava
from covspec.hf.tiny import save_tiny_llava
from covspec.protocol.verification import target_probs
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, EdgeUnreachable, Backoff
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.prefill import prefill_draft
from covspec.runtime_device.stats import GenerationStats
from covspec.families.llava.device import pixel_values
from covspec.runtime_edge import EdgeServer, ServerConfig

QUESTIONS = ["what color is the circle ?", "how many shapes are there ?", "is there a red square ?"]


def png_bytes(seed: int, size: int = 32) -> bytes:
    image = Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    save_tiny_llava(root / "draft", vocab_size=64, seed=0)
    save_tiny_llava(root / "target", vocab_size=64, seed=1, text_hidden=64)
    export_model(root / "draft", root / "draft-fp32", ExportOptions(quant="fp32"))
    export_model(root / "draft", root / "draft-int8", ExportOptions(quant="int8", min_agreement=0.0))
    # The target exported as its own draft: every draft token should be accepted.
    export_model(root / "target", root / "self-fp32", ExportOptions(quant="fp32"))
    model, processor = load_llava(root / "target")
    return {"root": root, "model": model, "processor": processor}


@pytest.fixture(scope="module")
def edge(tiny_pair):
    with EdgeServer(tiny_pair["root"] / "target", ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


def reference(pair, image: bytes, question: str, max_new_tokens: int) -> list[int]:
    processor = pair["processor"]
    inputs = processor(images=Image.open(io.BytesIO(image)), return_tensors="pt",
                       text=fill_prompt(prompt_template(processor), question))
    output = pair["model"].generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


BASELINE = DraftingOptions(lead="device", policy="fixed", pipeline=False, branches=0, keep_ratio=1.0)


def co_generate(artifact_dir, address, image, question, settings, backoff=Backoff(timeout_s=5),
                options=BASELINE):
    client = EdgeClient(address, backoff)
    stats = GenerationStats()
    try:
        tokens = [t for chunk in CoInference(DraftArtifact.load(artifact_dir), client)
                  .generate(image, question, settings, options, stats) for t in chunk]
    finally:
        client.close()
    return tokens, stats


@pytest.mark.parametrize("artifact", ["draft-fp32", "draft-int8", "self-fp32"])
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_greedy_output_equals_target_generate(tiny_pair, edge, artifact, draft_len):
    for seed, question in enumerate(QUESTIONS):
        image = png_bytes(seed)
        tokens, stats = co_generate(tiny_pair["root"] / artifact, edge.address, image, question,
                                    GenerationSettings(max_new_tokens=24),
                                    options=DraftingOptions(lead="device", policy="fixed", draft_len=draft_len, pipeline=False,
                                                            branches=0, keep_ratio=1.0))
        assert tokens == reference(tiny_pair, image, question, 24)
        assert stats.drafted > 0
        if artifact == "self-fp32":            # the target drafting for itself is always accepted
            assert sum(stats.accepted) == stats.drafted


def test_statistics_are_reported(tiny_pair, edge):
    _, stats = co_generate(tiny_pair["root"] / "self-fp32", edge.address, png_bytes(0), QUESTIONS[0],
                           GenerationSettings(max_new_tokens=16))
    report = stats.as_dict()
    assert report["tokens"] == 16 and report["rounds"] == 3        # 1 + 3 rounds x (4 accepted + bonus)
    assert report["drafted"] == report["accepted"] == 12
    assert report["bytes_up"] > 0 and report["bytes_down"] > 0 and report["ttft_s"] > 0


def test_sampling_is_reproducible_with_a_seed(tiny_pair, edge):
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=11)
    first, stats = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, png_bytes(3), QUESTIONS[1], settings)
    second, _ = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, png_bytes(3), QUESTIONS[1], settings)
    assert first == second and stats.drafted > 0


def target_joint(pair, image, question, temperature, top_k):
    """Exact target distribution of the first two generated tokens: {(t1, t2): prob}."""
    import torch

    processor, model = pair["processor"], pair["model"]
    inputs = processor(images=Image.open(io.BytesIO(image)), return_tensors="pt",
                       text=fill_prompt(prompt_template(processor), question))
    with torch.no_grad():
        first = target_probs(model(**inputs).logits[0, -1].numpy(), temperature, top_k)
        joint = {}
        for t1 in np.nonzero(first)[0]:
            ids = torch.cat([inputs["input_ids"], torch.tensor([[t1]])], dim=1)
            mask = torch.ones_like(ids)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
            second = target_probs(logits[0, -1].numpy(), temperature, top_k)
            for t2 in np.nonzero(second)[0]:
                joint[(int(t1), int(t2))] = first[t1] * second[t2]
    return joint


@pytest.mark.parametrize("wire", ["compact", "dense"])
def test_sampling_follows_target_distribution(tiny_pair, edge, wire):
    """The first two committed tokens (the second from draft + verify, in every run) follow p."""
    image, question = png_bytes(5), QUESTIONS[0]
    temperature, top_k, runs = 1.5, 4, 1200
    joint = target_joint(tiny_pair, image, question, temperature, top_k)
    artifact = DraftArtifact.load(tiny_pair["root"] / "draft-fp32")
    client = EdgeClient(edge.address, Backoff(timeout_s=5))
    counts = Counter()
    undrafted = 0
    try:
        engine = CoInference(artifact, client)
        for seed in range(runs):
            settings = GenerationSettings(max_new_tokens=2, temperature=temperature, top_k=top_k, seed=seed)
            options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0, wire=wire)
            stats = GenerationStats()
            tokens = [t for chunk in engine.generate(png_bytes(5), question, settings, options, stats) for t in chunk]
            counts[tuple(tokens)] += 1
            undrafted += stats.drafted == 0
    finally:
        client.close()
    assert undrafted == 0, f"{undrafted} of {runs} runs drafted nothing"
    assert set(counts) <= set(joint), "a pair with zero target probability was produced"
    cells = sorted(joint)
    observed = np.array([counts[c] for c in cells], dtype=float)
    expected = np.array([joint[c] for c in cells]) * runs
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


def test_edge_restart_loses_no_committed_token(tiny_pair):
    """The edge dies mid-answer and comes back on the same address: the device
    reopens with everything committed, and the answer is unchanged."""
    image, question = png_bytes(0), QUESTIONS[0]
    expected = reference(tiny_pair, image, question, 30)
    assert len(expected) > 4
    server = EdgeServer(tiny_pair["root"] / "target", ServerConfig(bind="tcp://127.0.0.1:*")).start()
    address = server.address
    client = EdgeClient(address, Backoff(timeout_s=0.5, retries=1, backoff_s=0.05))
    stats = GenerationStats()
    tokens: list[int] = []
    restarted = None
    try:
        stream = CoInference(DraftArtifact.load(tiny_pair["root"] / "draft-fp32"), client).generate(
            image, question, GenerationSettings(max_new_tokens=30),
            DraftingOptions(lead="device", policy="fixed", draft_len=2, pipeline=False, branches=0), stats)
        for chunk in stream:
            tokens += chunk
            if restarted is None:                 # right after the first committed token
                server.stop()
                restarted = EdgeServer(tiny_pair["root"] / "target", ServerConfig(bind=address)).start()
    finally:
        client.close()
        for s in (server, restarted):
            if s is not None:
                s.stop()
    assert restarted is not None and stats.reopens >= 1
    assert tokens == expected


def test_unreachable_edge_fails_clearly(tiny_pair, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(0))
    result = subprocess.run(
        [sys.executable, "-m", "covspec.cli.main", "device", "run", "--artifacts",
         str(tiny_pair["root"] / "draft-fp32"), "--edge", "tcp://127.0.0.1:9", "--image", str(image),
         "--prompt", "hi", "--timeout", "0.2", "--retries", "1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no reply from the edge" in result.stderr


def test_device_cli_runs_without_torch(tiny_pair, edge, tmp_path, no_torch):
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(1))
    script = """
        import sys
        from covspec.cli.main import cli
        cli(sys.argv[1:])
    """
    result = no_torch(script, "device", "run", "--artifacts", str(tiny_pair["root"] / "draft-int8"),
                      "--edge", edge.address, "--image", str(image), "--prompt", QUESTIONS[0],
                      "--max-new-tokens", "20", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["token_ids"] == reference(tiny_pair, png_bytes(1), QUESTIONS[0], 20)
    assert report["tokens"] == 20 and report["peak_rss_mb"] > 0


def test_corrupted_artifact_is_refused(tiny_pair, tmp_path):
    import shutil

    from click.testing import CliRunner

    from covspec.cli.main import cli

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pair["root"] / "draft-fp32", broken)
    with open(broken / "decoder.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(0))
    result = CliRunner().invoke(cli, ["device", "run", "--artifacts", str(broken), "--image", str(image),
                                      "--prompt", "hi"])
    assert result.exit_code == 1
    assert "decoder.onnx" in result.output and "sha256" in result.output


def test_preprocessing_matches_the_model_processor(tiny_pair):
    artifact = DraftArtifact.load(tiny_pair["root"] / "draft-fp32")
    image = Image.open(io.BytesIO(png_bytes(4, size=57)))
    expected = tiny_pair["processor"].image_processor(images=image, return_tensors="np")["pixel_values"]
    assert np.abs(pixel_values(image, artifact.manifest.image) - expected).max() <= 1e-5


def test_unreachable_edge_raises_in_the_api(tiny_pair):
    with pytest.raises(EdgeUnreachable):
        co_generate(tiny_pair["root"] / "draft-fp32", "tcp://127.0.0.1:9", png_bytes(0), "hi",
                    GenerationSettings(max_new_tokens=4), Backoff(timeout_s=0.1, retries=1, backoff_s=0.01))


SWITCHES = [DraftingOptions(lead="device", policy=policy, pipeline=pipeline, branches=branches, keep_ratio=keep)
            for policy in ("fixed", "adaptive") for pipeline in (False, True) for branches in (0, 2)
            for keep in (1.0, 0.125)]


@pytest.mark.parametrize("artifact", ["draft-int8", "self-fp32"])
def test_every_switch_combination_is_exact(tiny_pair, edge, artifact):
    """Greedy equality with every combination of policy, pipelining, branching and
    pruning. The random draft forces stale pipelined chunks (up to three behind a
    chunk) and branch misses; the self-draft forces pipelined and branch hits."""
    cases = [(seed, question) for seed, question in enumerate(QUESTIONS)]
    references = {case: reference(tiny_pair, png_bytes(case[0]), case[1], 20) for case in cases}
    totals = Counter()
    for options in SWITCHES:
        for seed, question in cases:
            tokens, stats = co_generate(tiny_pair["root"] / artifact, edge.address, png_bytes(seed), question,
                                        GenerationSettings(max_new_tokens=20), options=options)
            assert tokens == references[(seed, question)], options
            assert stats.drafted > 0, options
            totals.update(misses=stats.pipelined_misses, pipelined_hits=stats.pipelined_hits, branch_hits=stats.branch_hits,
                          branches=stats.branches_drafted)
            totals["deepest"] = max(totals["deepest"], stats.deepest_in_flight)
            if options.keep_ratio < 1:
                assert stats.kept_visual_tokens == 2            # 12.5% of 16 visual tokens
    assert totals["branches"] > 0
    assert totals["deepest"] == DraftingOptions().max_in_flight    # pipelines deeper than two were exercised
    if artifact == "draft-int8":
        assert totals["misses"] > 0                             # wrong assumptions happened and were survived
    else:
        assert totals["pipelined_hits"] > 0


def test_dense_wire_is_exact_and_carries_full_distributions(tiny_pair, edge):
    image, question = png_bytes(0), QUESTIONS[0]
    dense = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0, wire="dense")
    tokens, dense_stats = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, image, question,
                                      GenerationSettings(max_new_tokens=20), options=dense)
    assert tokens == reference(tiny_pair, image, question, 20)
    compact = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0)
    _, compact_stats = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, image, question,
                                   GenerationSettings(max_new_tokens=20), options=compact)
    vocab = 64
    assert dense_stats.drafted > 0 and dense_stats.rounds > 0
    # Every drafted position uploads V float16 values; every verdict downloads V more.
    assert dense_stats.bytes_up - compact_stats.bytes_up >= dense_stats.drafted * vocab * 2
    assert dense_stats.bytes_down - compact_stats.bytes_down >= dense_stats.rounds * vocab * 2


def test_dense_wire_sampling_is_reproducible(tiny_pair, edge):
    dense = DraftingOptions(lead="device", policy="fixed", draft_len=3, pipeline=False, branches=0, wire="dense")
    settings = GenerationSettings(max_new_tokens=12, temperature=0.8, seed=4)
    first, _ = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, png_bytes(1), QUESTIONS[1], settings,
                           options=dense)
    second, _ = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, png_bytes(1), QUESTIONS[1], settings,
                            options=dense)
    assert first == second and len(first) > 1


def pruned_reference(pair, image: bytes, question: str, kept: np.ndarray, max_new_tokens: int) -> list[int]:
    """The target's own greedy generate() over a context holding only the ``kept`` visual tokens."""
    import torch

    processor, model = pair["processor"], pair["model"]
    inputs = processor(images=Image.open(io.BytesIO(image)), return_tensors="pt",
                       text=fill_prompt(prompt_template(processor), question))
    ids = inputs["input_ids"][0]
    slots = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        features = features.reshape(-1, features.shape[-1])[torch.from_numpy(kept)]           # [K, D]
        text = model.get_input_embeddings()(ids)
        embeds = torch.cat([text[: slots[0]], features, text[slots[-1] + 1:]])[None]
        output = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return output[0].tolist()


def test_pruned_target_mode_is_opt_in_and_runs(tiny_pair, edge):
    """--prune-target is not exact in general: it equals the target's own greedy answer
    over the kept visual tokens only; keeping every token it is exact."""
    image, question = png_bytes(0), QUESTIONS[0]
    everything = DraftingOptions(lead="device", policy="fixed", draft_len=3, pipeline=False, branches=0, keep_ratio=1.0)
    pruned = GenerationSettings(max_new_tokens=16, prune_target=True)
    tokens, _ = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, image, question, pruned,
                            options=everything)
    assert tokens == reference(tiny_pair, image, question, 16)
    half = DraftingOptions(lead="device", policy="fixed", draft_len=3, pipeline=False, branches=0, keep_ratio=0.5)
    tokens, stats = co_generate(tiny_pair["root"] / "draft-fp32", edge.address, image, question, pruned,
                                options=half)
    artifact = DraftArtifact.load(tiny_pair["root"] / "draft-fp32")
    kept = prefill_draft(artifact, Drafter.from_artifact(artifact), Image.open(io.BytesIO(image)), question, half, seed=0).kept
    assert stats.kept_visual_tokens == len(kept) == 8
    assert tokens == pruned_reference(tiny_pair, image, question, kept, 16)
    assert tokens != reference(tiny_pair, image, question, 16)       # the target really saw fewer tokens


def test_toy_pair_greedy_exact_on_50_held_out_questions(toy_draft_int8, toy_set):
    """The product promise on the trained toy pair: int8 draft on the device, toy target
    on the edge, every CoVSpec feature on; 50 held-out questions, token for token."""
    from covspec.toy.models import bundled_model_dir

    artifact = DraftArtifact.load(toy_draft_int8)
    with EdgeServer(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        client = EdgeClient(server.address, Backoff(timeout_s=10))
        engine = CoInference(artifact, client)
        try:
            for question, expected in zip(toy_set["questions"], toy_set["references"], strict=True):
                tokens = [t for chunk in engine.generate(question.image_png, question.question,
                                                         GenerationSettings(max_new_tokens=64),
                                                         DraftingOptions(lead="device", keep_ratio=0.25))
                          for t in chunk]
                assert tokens == expected, question
            # one policy served all 50 generations and kept what it learned
            policy = engine.policy_for(DraftingOptions(lead="device", keep_ratio=0.25))
            assert policy.calibration.total.sum() > 100 and policy.verify.observed
        finally:
            client.close()
