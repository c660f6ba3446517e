"""The device runtime on arm64 under emulation (scripts/arm_device_check.sh).

The emulated check itself is opt-in: it takes minutes (about 5 the first time, to
build the arm64 root) and needs root and the network to Debian's mirror and the
package registry, so the default suite skips it. Run it with:

    COVSPEC_ARM=1 .venv/bin/python -m pytest -q tests/test_arm.py

It must prove something about ARM's drafts: every run drafted (device-led, fixed
length), and with the int8 and int4 drafts computing in float32 from their quantized
weights (accuracy level 0) ARM's drafted and accepted counts equal x86's question by
question. As exported (level 4, int8 activations) onnxruntime's ARM and x86 kernels
round differently, so there the differing questions are reported, not failed. The
check's verdict (``covspec.bench.device.arm.failures``) is tested in the default suite, so a
check that cannot fail is caught without the emulator.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from covspec.bench.device.arm import DRAFTS, FIXED_DRAFTING, LEVEL0, Run, at_accuracy_level_0, failures

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "arm_device_check.sh"
QUESTIONS = 2


def runs(arm: tuple[int, int], x86: tuple[int, int] = (8, 5), identical: bool = True,
         draft: str = "int8" + LEVEL0) -> list[Run]:
    """One question of ``draft`` on both platforms: (drafted, accepted) each."""
    return [Run("arm64", draft, 0, identical, 12, *arm, wall_s=3.0), Run("x86_64", draft, 0, True, 12, *x86, 0.4)]


def test_the_check_runs_device_led_with_fixed_drafting():
    drafting = " ".join(FIXED_DRAFTING)
    assert "--lead device" in drafting and "--draft-policy fixed" in drafting
    assert "--no-pipeline" in drafting and "--branches 0" in drafting


def test_the_check_passes_only_when_both_platforms_drafted_the_same():
    assert failures(runs((8, 5))) == []
    assert failures(runs((8, 4))) == ["int8-level0 q0: ARM accepted 4/8, x86 5/8"]
    assert failures(runs((9, 5))) == ["int8-level0 q0: ARM accepted 5/9, x86 5/8"]
    # Nothing drafted on either side fails, even though the counts agree (0/0 = 0/0).
    assert failures(runs((0, 0), (0, 0), draft="int4")) == ["arm64 int4 q0: nothing drafted",
                                                            "x86_64 int4 q0: nothing drafted"]
    assert failures(runs((8, 5), identical=False, draft="int4")) == ["arm64 int4 q0: answer differs from the target's"]
    assert failures(runs((8, 5))[:1]) == ["int8-level0 q0: no x86_64 run to compare with"]
    # As exported (int8 activations), ARM's kernels may round otherwise: reported, not failed.
    assert failures(runs((8, 4), draft="int4")) == []


def test_level_0_changes_only_the_compute_type(tmp_path):
    """The level-0 copy of an int4 draft: the same weights, float32 activations, a valid manifest."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from covspec.export.pipeline import ExportOptions, export_model
    from covspec.hf.tiny import save_tiny_llava
    from covspec.runtime_device.artifact import DraftArtifact

    save_tiny_llava(tmp_path / "draft", vocab_size=64, seed=0)
    folder = export_model(tmp_path / "draft", tmp_path / "int4", ExportOptions(quant="int4", min_agreement=0.0)).folder
    copy = at_accuracy_level_0(folder, tmp_path / f"int4{LEVEL0}")
    before, after = onnx.load(str(folder / "decoder.onnx")), onnx.load(str(copy / "decoder.onnx"))
    levels = [a.i for n in after.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"]
    assert levels and set(levels) == {0}
    assert {a.i for n in before.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"} == {4}
    weights = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    assert all(np.array_equal(weights[t.name], numpy_helper.to_array(t)) for t in after.graph.initializer)
    assert DraftArtifact.load(copy).manifest.quantization["accuracy_level"] == 0     # hashes verified


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("COVSPEC_ARM") != "1", reason="opt-in: set COVSPEC_ARM=1 (minutes; root)")
def test_device_on_arm64_drafts_and_answers_as_on_x86(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the ARM check needs root (debootstrap, binfmt_misc, chroot)")
    out = tmp_path / "result.json"
    done = subprocess.run([str(SCRIPT), "--questions", str(QUESTIONS), "--out", str(out)], capture_output=True,
                          text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    result = json.loads(out.read_text())
    assert result["arm64"]["machine"] == "aarch64"
    assert result["host"]["machine"] == "x86_64"
    assert "--lead device" in result["settings"]["drafting"]
    assert result["failures"] == []
    assert [row["quant"] for row in result["summary"]] == list(DRAFTS)
    runs_ = result["runs"]
    assert len(runs_) == QUESTIONS * len(DRAFTS) * 2    # questions x drafts x platforms
    assert all(run["identical"] and not run["error"] and run["tokens"] > 0 and run["drafted"] > 0 for run in runs_)
    counts = {}
    for run in runs_:
        counts.setdefault((run["quant"], run["question"]), {})[run["platform"]] = (run["drafted"], run["accepted"])
    for (draft, question), both in counts.items():
        if draft.endswith(LEVEL0):
            assert both["arm64"] == both["x86_64"], (draft, question)
    for row in result["summary"]:
        for name in ("arm64", "x86_64"):
            assert row[name]["drafted"] > 0 and 0 < row[name]["acceptance"] <= 1
