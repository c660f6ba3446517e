"""The deployment regime: padded calls take the profile's time, overruns are counted, the
plan's formulas hold on crafted numbers, and answers stay exact under any regime."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare
from test_device import QUESTIONS, png_bytes, reference, target_joint, tiny_pair  # noqa: F401 - the fixture

from covspec.regime import DevicePacing, EdgePacing, Pacer, RegimeError, builtin_regimes, load_regime
from covspec.regime import plan, roofline
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, Backoff
from covspec.runtime_device.drafter import Drafter
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.stats import GenerationStats

SLACK_S = 0.005       # a padded call may take this much beyond its emulated time (sleep wake-up, bookkeeping)
REPEATS = 3           # the least of a few repeats: a loaded machine's late wake-ups are noise, not padding


def fast_regime(tmp_path, step_ms: float = 4.0, draft_ms: float = 1.0, vision_ms: float = 5.0):
    """A profile file whose times are small but above the tiny models' real compute."""
    builtin = load_regime("phone-135m@7b-a100-hf")
    device = {**builtin.device.__dict__, "phone_factor": 1.0, "decode_step_ms": draft_ms, "decode_row_ms": 0.2,
              "prefill_token_ms": 0.2, "vision_frame_ms": vision_ms}
    target = {**builtin.target.__dict__, "layer_overhead_ms": step_ms / builtin.target.layers, "params_b": 0.001,
              "vision_ms": 5.0}
    path = tmp_path / "fast.json"
    path.write_text(json.dumps({"name": "fast", "device": device, "target": target}))
    return str(path)


def test_builtin_regimes_load_and_cite_their_sources():
    data = json.loads((__import__("covspec.regime.profiles", fromlist=["PROFILES"]).PROFILES).read_text())
    for section in ("devices", "gpus", "models", "engines"):
        for name, profile in data[section].items():
            numbers = [k for k, v in profile.items() if isinstance(v, (int, float)) and k != "bytes_per_param"]
            assert set(numbers) <= set(profile["sources"]) | {"layers", "hidden", "kv_dim"}, (section, name)
    for name in builtin_regimes():
        regime = load_regime(name)
        assert 0.005 < roofline.step_s(regime.target) < 0.05
    assert abs(roofline.step_s(load_regime("phone-135m@7b-a100-hf").target) - 0.025) < 0.001
    assert abs(roofline.step_s(load_regime("phone-135m@7b-a100-vllm").target) - 0.012) < 0.001


def test_bad_regimes_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(RegimeError, match="DEVICE@TARGET"):
        load_regime("phone-135m")
    with pytest.raises(RegimeError, match="unknown target profile"):
        load_regime("phone-135m@7b-a100-nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": {"phone_factor": 1}, "target": {}}))
    with pytest.raises(RegimeError, match="lacks"):
        load_regime(str(bad))


def test_the_roofline_is_memory_bound_until_the_knee():
    target = load_regime("phone-135m@7b-a100-hf").target
    one, batch16 = roofline.forward_s(target, [256], [1]), roofline.forward_s(target, [256] * 16, [1] * 16)
    assert batch16 < one * 1.1                                   # batching is nearly free below the knee
    knee = int(roofline.knee_tokens(target))
    far = roofline.forward_s(target, [0], [knee * 4])
    assert far > 2.5 * one                                       # compute-bound beyond it


def test_overruns_are_counted_and_padding_only_adds_time():
    pacer = Pacer()
    with pacer.pad(0.0):
        time.sleep(0.003)
    began = time.perf_counter()
    with pacer.pad(0.02):
        pass
    assert 0.02 <= time.perf_counter() - began < 0.02 + SLACK_S
    counts = pacer.counts()
    assert counts["calls"] == 2 and counts["overruns"] == 1 and counts["overrun_ms"] >= 3
    assert counts["padded_ms"] > 15


def timed(pacing, call, repeats: int = 1) -> tuple[float, bool]:
    """(the least seconds ``call`` took over ``repeats`` calls, whether the pacer counted
    an overrun in every one of them)."""
    least, overran = float("inf"), True
    for _ in range(repeats):
        before = pacing.pacer.overruns
        began = time.perf_counter()
        call()
        least = min(least, time.perf_counter() - began)
        overran = overran and pacing.pacer.overruns > before
    return least, overran


def assert_paced(elapsed: float, overran: bool, emulated: float) -> None:
    """A padded call takes at least its emulated time, and at most a few ms more unless
    its real compute overran (then it was counted, and took what it took)."""
    assert elapsed >= emulated
    assert overran or elapsed < emulated + SLACK_S


def test_a_padded_target_forward_takes_the_profiles_time():
    import io

    import torch
    from PIL import Image

    from covspec.bench.harness.workload import toy_questions
    from covspec.runtime_edge.target import TargetModel
    from covspec.toy.models import bundled_model_dir

    regime = load_regime("phone-135m@13b-a100-hf")
    target = TargetModel.load(bundled_model_dir("target"))
    question = toy_questions(1)[0]
    context = target.context(question.question, Image.open(io.BytesIO(question.image_png)))
    padded = []
    with torch.inference_mode():
        target.prefill(context)                                  # warm-up, unpadded
        target.pacing = EdgePacing(regime.target)
        holder = {}
        elapsed, overran = timed(target.pacing, lambda: holder.update(cache=target.prefill(context)[0]))
        assert_paced(elapsed, overran, roofline.prefill_s(regime.target, context.length))
        cache = holder["cache"]
        for chunk in ([5], [5, 6, 7, 8], [9]):
            past = cache.kv.length

            def forward() -> None:
                target.extend(cache, chunk)
                target.rollback(cache, past)

            elapsed, overran = timed(target.pacing, forward, REPEATS)
            assert_paced(elapsed, overran, roofline.forward_s(regime.target, [past], [len(chunk)]))
            padded.append(not overran)
    assert any(padded), "every forward overran: nothing here tested the padding"


def test_a_padded_draft_run_takes_the_phones_time(toy_draft_int8):
    from covspec.bench.harness.workload import toy_questions
    from covspec.runtime_device.prefill import prefill_draft
    from covspec.runtime_device.preprocess import load_image

    regime = load_regime("phone-135m@7b-a100-hf")
    artifact = DraftArtifact.load(toy_draft_int8, threads=1, pacing=DevicePacing(regime.device))
    drafter = Drafter.from_artifact(artifact)
    question = toy_questions(1)[0]
    elapsed, overran = timed(artifact.pacing, lambda: prefill_draft(
        artifact, drafter, load_image(question.image_png), question.question, DraftingOptions(), 0))
    assert elapsed >= roofline.vision_s(regime.device, 1) + roofline.decoder_s(regime.device, drafter.context_len, True)
    padded = []
    for tokens in ([5], [5, 6, 7], [8]):
        fed = drafter.generated

        def run() -> None:
            drafter.feed(tokens)
            drafter.truncate(fed)

        elapsed, overran = timed(artifact.pacing, run, REPEATS)
        assert_paced(elapsed, overran, roofline.decoder_s(regime.device, len(tokens), prefill=False))
        padded.append(not overran)
    assert any(padded), "every draft run overran: nothing here tested the padding"


# -- the plan's formulas on crafted numbers --------------------------------------------------------

COSTS = plan.Costs(target_step_s=0.025, target_prefill_s=0.1, verify_s=tuple([0.025] * 40), draft_step_s=0.005,
                   draft_prefill_s=0.2, rtt_s=0.01, upload_s=0.0)


def test_target_only_and_device_led_times():
    assert plan.target_only_s(COSTS, 41) == pytest.approx(0.11 + 40 * 0.025)
    # alpha = 1: every round of k commits k + 1 tokens; 40 tokens after the first = 8 rounds of k = 4.
    expected = 0.2 + 8 * (4 * 0.005 + 0.01 + 0.025)
    assert plan.device_led_s(COSTS, 41, [1.0], 4) == pytest.approx(expected)
    assert plan.expected_accepted([0.5], 3) == pytest.approx(0.5 + 0.25 + 0.125)
    assert plan.expected_accepted([1.0, 0.5], 3, skip=1) == pytest.approx(0.5 + 0.25)


def test_acceptance_curve_from_rounds():
    # rounds of 4: two accepted all, one accepted 1, one accepted 0
    curve = plan.acceptance_curve([4, 4, 1, 0], 4)
    assert curve == pytest.approx([3 / 4, 2 / 3, 1.0, 1.0])


def test_edge_led_never_drafts_when_the_overlap_cannot_survive():
    slow_link = plan.Costs(**{**COSTS.__dict__, "rtt_s": 0.3})
    # the overlap is (0.3 + L x 0.005) / 0.025 > 12 tokens: 0.5 ** 12 < 0.1
    assert plan.edge_led_s(slow_link, 41, [0.5], ) == pytest.approx(plan.target_only_s(slow_link, 41))
    assert plan.edge_led_s(COSTS, 41, [0.95]) < plan.target_only_s(COSTS, 41)


def test_hand_over_streams_until_the_draft_is_ready_then_runs_rounds():
    # The draft is ready at 0.2 s; the hand-over chunk (4 x 5 ms) travels (10 ms) and meets the edge
    # mid-step (12.5 ms): the edge streams 1 + (0.2425 - 0.11) / 0.025 = 6.3 tokens until 0.2425 s.
    assert plan.hand_over_s(COSTS, 6, [1.0], 4) == pytest.approx(plan.target_only_s(COSTS, 6))
    # alpha = 1: the 41 - 6.3 = 34.7 tokens left take 6 rounds of 4 (5 tokens each), then one of 4.
    assert plan.hand_over_s(COSTS, 41, [1.0], 4) == pytest.approx(0.2425 + 7 * (4 * 0.005 + 0.035))
    assert plan.hand_over_s(COSTS, 41, [1.0], 4) < plan.device_led_s(COSTS, 41, [1.0], 4)
    # rounds that barely beat the edge alone (1.1x < HAND_OVER_GAIN): edge-led throughout
    poor = plan.Costs(**{**COSTS.__dict__, "draft_step_s": 0.02})
    assert plan.round_rate(poor, [0.3], 1) * poor.target_step_s < plan.HAND_OVER_GAIN
    assert plan.hand_over_s(poor, 41, [0.3], 1) == pytest.approx(plan.edge_led_s(poor, 41, [0.3]))


def test_recommend_steps_aside_when_the_draft_is_slow():
    slow_draft = plan.Costs(**{**COSTS.__dict__, "draft_step_s": 0.05, "draft_prefill_s": 3.0})
    assert plan.recommend(slow_draft, 41, [0.8]).mode == "target-only"
    fast = plan.recommend(COSTS, 41, [0.9])
    assert fast.mode != "target-only" and fast.speedup > 1.2


# -- exactness under a regime ----------------------------------------------------------------------

@pytest.mark.parametrize("lead", ["edge", "device"])
def test_greedy_is_exact_under_a_regime(tiny_pair, tmp_path, lead):  # noqa: F811
    from covspec.runtime_edge import EdgeServer, ServerConfig

    regime = fast_regime(tmp_path)
    artifact = DraftArtifact.load(tiny_pair["root"] / "self-fp32", pacing=DevicePacing(load_regime(regime).device))
    drafted = 0
    with EdgeServer(tiny_pair["root"] / "target", ServerConfig(bind="tcp://127.0.0.1:*", regime=regime)) as server:
        client = EdgeClient(server.address, Backoff(timeout_s=5))
        device = CoInference(artifact, client)
        for seed, question in enumerate(QUESTIONS):
            image, stats = png_bytes(seed), GenerationStats()
            options = DraftingOptions(lead=lead, keep_ratio=1.0)
            answer = [t for c in device.generate(image, question, GenerationSettings(max_new_tokens=24), options,
                                                 stats) for t in c]
            assert answer == reference(tiny_pair, image, question, 24)
            drafted += stats.drafted
        client.close()
        assert server.counters()["forwards"] > 0
    assert drafted > 0, "nothing was drafted: the check could not have failed"


def test_edge_led_sampling_follows_the_target_under_a_regime(tiny_pair, tmp_path):  # noqa: F811
    """The first two tokens of edge-led sampled answers, with the edge stepping on the
    regime's clock while chunks arrive, follow the target's joint distribution."""
    from covspec.runtime_edge import EdgeServer, ServerConfig

    regime = fast_regime(tmp_path, step_ms=3.0, draft_ms=0.5)
    image, question = png_bytes(5), QUESTIONS[0]
    temperature, top_k, runs = 1.5, 4, 500
    joint = target_joint(tiny_pair, image, question, temperature, top_k)
    artifact = DraftArtifact.load(tiny_pair["root"] / "draft-fp32", pacing=DevicePacing(load_regime(regime).device))
    counts, accepted = Counter(), 0
    with EdgeServer(tiny_pair["root"] / "target", ServerConfig(bind="tcp://127.0.0.1:*", regime=regime)) as server:
        client = EdgeClient(server.address, Backoff(timeout_s=5))
        engine = CoInference(artifact, client)
        for seed in range(runs):
            stats = GenerationStats()
            settings = GenerationSettings(max_new_tokens=2, temperature=temperature, top_k=top_k, seed=seed)
            tokens = [t for c in engine.generate(image, question, settings, DraftingOptions(lead="edge", keep_ratio=1.0),
                                                 stats) for t in c]
            counts[tuple(tokens)] += 1
            accepted += sum(stats.accepted)
        client.close()
    assert set(counts) <= set(joint), "a pair with zero target probability was produced"
    cells = sorted(joint)
    observed = np.array([counts[c] for c in cells], dtype=float)
    expected = np.array([joint[c] for c in cells]) * runs
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


def test_an_answer_complete_before_the_draft_is_ready_does_not_wait_for_it(tiny_pair, tmp_path):  # noqa: F811
    """Edge-led, a phone whose vision takes 3 s: a 2-token answer comes in the edge's time,
    the abandoned prefill ends at once, and the next answer on the same device is exact."""
    from covspec.runtime_edge import EdgeServer, ServerConfig

    regime = fast_regime(tmp_path, vision_ms=3000.0)
    artifact = DraftArtifact.load(tiny_pair["root"] / "self-fp32", pacing=DevicePacing(load_regime(regime).device))
    image, question = png_bytes(0), QUESTIONS[0]
    with EdgeServer(tiny_pair["root"] / "target", ServerConfig(bind="tcp://127.0.0.1:*", regime=regime)) as server:
        client = EdgeClient(server.address, Backoff(timeout_s=5))
        device = CoInference(artifact, client)
        stats = GenerationStats()
        began = time.perf_counter()
        short = [t for c in device.generate(image, question, GenerationSettings(max_new_tokens=2),
                                            DraftingOptions(lead="edge"), stats) for t in c]
        assert time.perf_counter() - began < 1.0
        assert stats.prefill_abandoned and short == reference(tiny_pair, image, question, 2)
        stats = GenerationStats()
        long = [t for c in device.generate(image, question, GenerationSettings(max_new_tokens=24),
                                           DraftingOptions(lead="edge"), stats) for t in c]
        client.close()
    assert long == reference(tiny_pair, image, question, 24)


def test_the_plan_command_lists_recommends_and_refuses():
    from click.testing import CliRunner

    from covspec.cli.main import cli

    listed = CliRunner().invoke(cli, ["plan", "--list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in builtin_regimes())
    slow_draft = CliRunner().invoke(cli, ["plan", "--regime", "phone-0.5b@7b-a100-vllm", "--link", "4g"])
    assert slow_draft.exit_code == 0 and "recommended: target-only" in slow_draft.output
    fast_draft = CliRunner().invoke(cli, ["plan", "--regime", "phone-135m@13b-a100-hf", "--alpha", "0.9"])
    assert fast_draft.exit_code == 0 and "recommended: target-only" not in fast_draft.output
    bad = CliRunner().invoke(cli, ["plan", "--regime", "phone-9b@7b-a100-hf"])
    assert bad.exit_code == 2 and "unknown device profile" in bad.output


def test_bench_regime_measures_every_scenario_and_labels_its_table(tmp_path):
    from covspec.bench.end_to_end.plan_check import validate
    from covspec.bench.end_to_end.regime import measure_regimes, regime_scenarios, regime_section
    from covspec.bench.harness.link import profile_named
    from covspec.bench.harness.workload import toy_questions
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    regime, links = fast_regime(tmp_path, step_ms=8.0), [profile_named("loopback")]
    results = measure_regimes([regime], ensure_toy_artifacts(), bundled_model_dir("target"), links, toy_questions(2),
                              GenerationSettings(max_new_tokens=24), tmp_path / "edge.log")
    records = results[regime]
    assert {r["scenario"] for r in records} == {s.name for s in regime_scenarios()}
    baseline = {r["scene"]: r["token_ids"] for r in records if r["scenario"] == "target-only"}
    assert all(r["token_ids"] == baseline[r["scene"]] for r in records)
    assert sum(r["drafted"] for r in records if r["scenario"] == "plan-device-led") > 0
    table = regime_section(regime, records, links)
    assert "(emulated)" in table and "overruns" in table
    data = {"links": [link.__dict__ for link in links], "records": results, "plan_draft_len": 8}
    rows = validate(data)
    assert rows and all(r["measured"] > 0 and r["predicted"] > 0 for r in rows)
