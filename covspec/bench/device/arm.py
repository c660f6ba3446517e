"""The device runtime on arm64 (emulated) beside x86_64: exact answers, the same drafts.

``scripts/arm_device_check.sh`` builds an arm64 Debian root with ``covspec[device]``
installed from aarch64 wheels, then runs this module on the host::

    python -m covspec.bench.device.arm --root ROOT --device-python /opt/covspec/bin/python --work DIR --questions N

It exports the toy draft int8 and int4 on the host (reused while the bundled draft is
unchanged), computes the target's greedy answer to N toy questions (transformers
``generate``), starts an edge on the host's loopback, and runs ``covspec device run``
for every question and quantization twice: inside the root (``chroot``; qemu-aarch64
through binfmt runs the arm64 Python, numpy and onnxruntime) and natively on x86_64.
Both run device-led (``--lead device``: the target waits for every chunk, so what is
committed never depends on how fast the device drafts) with the same fixed drafting
(4 tokens a chunk, no pipelining, no branches). Edge-led, the emulated device (seconds
a question) never drafted before the target finished by itself, and the check compared
nothing of ARM's kernels; the adaptive policy would react to the emulator's slow
drafting. So both platforms draft the same chunks unless onnxruntime's ARM and x86
kernels make the draft propose different tokens.

Each quantization runs twice. As exported (``int8``, ``int4``), its ``MatMulNBits``
nodes compute at accuracy level 4: activations quantized to int8 per block, which
onnxruntime's ARM kernels (NEON dot product / i8mm, KleidiAI for 4 bits) and its x86
kernels (AVX-512 VNNI) round and accumulate differently, so a near tie in the draft's
logits can fall the other way and the counts may differ on a few questions (measured:
BENCHMARKS.md, "Device on ARM"). At accuracy level 0 (``int8-level0``, ``int4-level0``:
the same files with only that attribute changed, ``at_accuracy_level_0``) both compute
in float32 from the same quantized weights, so the counts must be equal.

The check fails (exit status 1, every failure listed by ``failures``) when
- an answer differs from the target's greedy answer token for token (or a run failed),
- a run drafted nothing (its answer would prove nothing about the draft on ARM), or
- at accuracy level 0, ARM's drafted or accepted count differs from x86's on the same
  question (same policy, same arithmetic: the counts must be equal).
At level 4 the questions whose counts differ are listed (``count_mismatches``) beside
both acceptances. Exit status 0 otherwise. Wall times are recorded but they are times
under emulation, not the device's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

QUANTS = ("int8", "int4")
LEVEL0 = "-level0"                       # the same artifact computing with float32 activations
DRAFTS = QUANTS + tuple(quant + LEVEL0 for quant in QUANTS)
MAX_NEW_TOKENS = 64
# Device-led fixed drafting: the target waits for every chunk and the chunk length does not
# depend on measured times, so the emulator's slowness changes no count (edge-led: nothing drafted).
FIXED_DRAFTING = ["--lead", "device", "--draft-policy", "fixed", "--draft-len", "4", "--no-pipeline",
                  "--branches", "0"]
PLATFORMS = ("arm64", "x86_64")
IN_ROOT = Path("/opt/covspec-check")     # where artifacts and images lie inside the arm64 root
REPLY_TIMEOUT_S = 30                     # the edge shares 2 cores with qemu: do not resend early

# The arm64 CPU features the kernel (here: qemu) reports, which onnxruntime's kernel choice follows.
ARM_FEATURES = """
import ctypes
getauxval = ctypes.CDLL(None).getauxval
getauxval.restype = ctypes.c_ulong
hwcap, hwcap2 = getauxval(16), getauxval(26)      # AT_HWCAP, AT_HWCAP2
bits = [("asimd", hwcap, 1), ("asimddp", hwcap, 20), ("sve", hwcap, 22),
        ("sve2", hwcap2, 1), ("i8mm", hwcap2, 13), ("bf16", hwcap2, 14)]
print(" ".join(name for name, word, bit in bits if word >> bit & 1) or "none")
"""


@dataclass
class Run:
    platform: str          # "arm64" (emulated) or "x86_64"
    quant: str
    question: int
    identical: bool        # token_ids == the target's greedy answer
    tokens: int
    drafted: int
    accepted: int
    wall_s: float          # of the whole command; under emulation, not a speed
    error: str = ""


def export_artifacts(work: Path, log=print) -> dict[str, Path]:
    """The toy draft exported int8 and int4 under ``work`` (each reused while current)."""
    from covspec.export.pipeline import ExportOptions, export_model, source_hash
    from covspec.protocol.manifest import ArtifactError, load_manifest
    from covspec.toy.artifacts import parity_prompts
    from covspec.toy.models import bundled_model_dir

    draft = bundled_model_dir("draft")
    folders = {}
    for quant in QUANTS:
        folder = work / f"toy-draft-{quant}"
        try:
            manifest = load_manifest(folder)
            current = manifest.source["sha256"] == source_hash(draft) and manifest.quantization["scheme"] == quant
        except ArtifactError:
            current = False
        if not current:
            log(f"   exporting the toy draft {quant} to {folder}")
            export_model(draft, folder, ExportOptions(quant=quant, force=True), prompts=parity_prompts())
        folders[quant] = folder
        folders[quant + LEVEL0] = at_accuracy_level_0(folder, work / f"toy-draft-{quant}{LEVEL0}")
    return folders


def at_accuracy_level_0(folder: Path, target: Path) -> Path:
    """A copy of the artifact ``folder`` at ``target`` whose ``MatMulNBits`` nodes compute
    at accuracy level 0 (float32 activations); weights and every other file unchanged."""
    import onnx

    from covspec.protocol.manifest import MANIFEST_FILE, describe_files

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    for graph in sorted(target.glob("*.onnx")):
        model = onnx.load(str(graph))
        for node in model.graph.node:
            for attribute in node.attribute:
                if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                    attribute.i = 0
        onnx.save(model, str(graph))
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["quantization"]["accuracy_level"] = 0
    manifest["files"] = describe_files(target)
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return target


def device_run(command: list[str], artifacts: str, image: str, question: str, address: str) -> dict:
    """``covspec device run ... --json`` through ``command``; its JSON report (raises on failure)."""
    args = [*command, "device", "run", "--artifacts", artifacts, "--edge", address, "--image", image,
            "--prompt", question, "--max-new-tokens", str(MAX_NEW_TOKENS), *FIXED_DRAFTING,
            "--timeout", str(REPLY_TIMEOUT_S), "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def accepted_tokens(report: dict) -> int:
    """Draft tokens the edge accepted in one ``device run --json`` report."""
    return int(report["accepted"])


def acceptance(runs: list[Run]) -> float:
    drafted = sum(r.drafted for r in runs)
    return sum(r.accepted for r in runs) / drafted if drafted else 0.0


def summarize(runs: list[Run], questions: int) -> list[dict]:
    """One row per draft: ARM and x86 acceptance, answers identical per platform, and the
    questions whose counts differ."""
    rows = []
    for quant in DRAFTS:
        row = {"quant": quant, "questions": questions}
        for name in PLATFORMS:
            mine = [r for r in runs if r.quant == quant and r.platform == name]
            row[name] = {"identical": sum(r.identical for r in mine), "runs": len(mine),
                         "drafted": sum(r.drafted for r in mine), "accepted": sum(r.accepted for r in mine),
                         "acceptance": round(acceptance(mine), 4), "tokens": sum(r.tokens for r in mine),
                         "wall_s": round(sum(r.wall_s for r in mine), 1)}
        row["count_mismatches"] = count_mismatches([r for r in runs if r.quant == quant])
        rows.append(row)
    return rows


def count_mismatches(runs: list[Run]) -> list[str]:
    """One line per question and quantization where ARM's drafted or accepted count is
    not x86's (or one platform has no run); empty when they are equal everywhere."""
    by_key = {(r.platform, r.quant, r.question): r for r in runs}
    found = []
    for quant, question in sorted({(r.quant, r.question) for r in runs}):
        arm, x86 = (by_key.get((name, quant, question)) for name in PLATFORMS)
        if arm is None or x86 is None:
            found.append(f"{quant} q{question}: no {'arm64' if arm is None else 'x86_64'} run to compare with")
        elif (arm.drafted, arm.accepted) != (x86.drafted, x86.accepted):
            found.append(f"{quant} q{question}: ARM accepted {arm.accepted}/{arm.drafted}, "
                         f"x86 {x86.accepted}/{x86.drafted}")
    return found


def failures(runs: list[Run]) -> list[str]:
    """Why the check fails, one line per problem (empty: it passes): an answer not the
    target's, a run that drafted nothing, ARM's counts not x86's on a question at
    accuracy level 0 (``LEVEL0`` drafts)."""
    found = [f"{r.platform} {r.quant} q{r.question}: answer differs from the target's {r.error}".rstrip()
             for r in runs if not r.identical]
    found += [f"{r.platform} {r.quant} q{r.question}: nothing drafted" for r in runs if r.drafted == 0 and not r.error]
    return found + count_mismatches([r for r in runs if r.quant.endswith(LEVEL0)])


def describe_platforms(arm_python: list[str]) -> dict:
    """Versions and CPU of the host and of the arm64 root (``arm_python``: chroot ROOT PYTHON)."""
    import numpy
    import onnxruntime

    probe = ("import json, platform, numpy, onnxruntime; print(json.dumps({'machine': platform.machine(), "
             "'python': platform.python_version(), 'onnxruntime': onnxruntime.__version__, "
             "'numpy': numpy.__version__}))")
    arm = json.loads(subprocess.run([*arm_python, "-c", probe], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    arm["cpu_features"] = subprocess.run([*arm_python, "-c", ARM_FEATURES], capture_output=True, text=True,
                                         check=True).stdout.strip()
    arm["emulated"] = "qemu-aarch64 (binfmt), Debian bookworm root"
    host = {"machine": platform.machine(), "processor": _cpu_model(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    return {"host": host, "arm64": arm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covspec.bench.device.arm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="The arm64 root with covspec[device] installed.")
    parser.add_argument("--device-python", default="/opt/covspec/bin/python",
                        help="The Python of covspec[device], as a path inside the root.")
    parser.add_argument("--work", type=Path, required=True, help="Folder for artifacts, images, edge log.")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--out", type=Path, help="Write the results as JSON here (default: WORK/result.json).")
    args = parser.parse_args(argv)

    from covspec.bench.harness.devices import greedy_references
    from covspec.bench.harness.workload import toy_questions
    from covspec.runtime_edge import EdgeProcess, ServerConfig
    from covspec.toy.models import bundled_model_dir

    began = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    artifacts = export_artifacts(args.work)
    questions = toy_questions(args.questions)
    print(f"   target greedy references for {len(questions)} questions", flush=True)
    references = greedy_references(bundled_model_dir("target"), questions, MAX_NEW_TOKENS)

    # Everything the arm64 device reads lies inside the root; x86 reads the same files from the host side.
    inside = args.root / IN_ROOT.relative_to("/")
    shutil.rmtree(inside, ignore_errors=True)
    (inside / "images").mkdir(parents=True)
    for quant, folder in artifacts.items():
        shutil.copytree(folder, inside / quant)
    for i, question in enumerate(questions):
        (inside / "images" / f"q{i}.png").write_bytes(question.image_png)

    arm_cmd = ["chroot", str(args.root), args.device_python, "-m", "covspec"]
    x86_cmd = [sys.executable, "-m", "covspec"]
    machines = describe_platforms(arm_cmd[:3])
    arm, host = machines["arm64"], machines["host"]
    print(f"   arm64 root: {arm['machine']} Python {arm['python']}, onnxruntime {arm['onnxruntime']}, "
          f"numpy {arm['numpy']}, CPU features (HWCAP) {arm['cpu_features']}; host: {host['machine']} "
          f"Python {host['python']}, onnxruntime {host['onnxruntime']}, numpy {host['numpy']}", flush=True)

    runs: list[Run] = []
    edge_log = args.work / "edge.log"
    with EdgeProcess(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*"), log_path=edge_log) as edge:
        print(f"   edge on {edge.address} (log: {edge_log})", flush=True)
        for quant in DRAFTS:
            for name, command, root in (("arm64", arm_cmd, IN_ROOT), ("x86_64", x86_cmd, inside)):
                for i, question in enumerate(questions):
                    start = time.monotonic()
                    try:
                        report = device_run(command, str(root / quant), str(root / "images" / f"q{i}.png"),
                                            question.question, edge.address)
                        run = Run(name, quant, i, report["token_ids"] == references[i], len(report["token_ids"]),
                                  report["drafted"], accepted_tokens(report), time.monotonic() - start)
                    except Exception as exc:  # noqa: BLE001 - a failed run is a differing answer, reported
                        run = Run(name, quant, i, False, 0, 0, 0, time.monotonic() - start,
                                  f"{type(exc).__name__}: {exc}")
                    runs.append(run)
                    mark = "identical" if run.identical else f"DIFFERS {run.error}"
                    print(f"   {name:6} {quant} q{i:<2} {run.tokens:3} tokens, accepted {run.accepted}/{run.drafted}"
                          f", {run.wall_s:5.1f} s: {mark}", flush=True)

    rows = summarize(runs, len(questions))
    print("\n   draft         ARM acceptance  x86 acceptance  answers identical (ARM, x86)  questions, counts differ")
    for row in rows:
        arm, x86 = row["arm64"], row["x86_64"]
        print(f"   {row['quant']:12}  {arm['acceptance']:14.3f}  {x86['acceptance']:14.3f}  "
              f"{arm['identical']:>2}/{arm['runs']}, {x86['identical']:>2}/{x86['runs']}{'':17}"
              f"{len(row['count_mismatches'])}: {'; '.join(row['count_mismatches']) or '-'}")
    problems = failures(runs)
    same = not count_mismatches(runs)
    print(f"   ARM and x86 drafted and accepted the same counts on every question, every draft: {same}")

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machines,
              "settings": {"max_new_tokens": MAX_NEW_TOKENS, "drafting": " ".join(FIXED_DRAFTING)},
              "summary": rows, "same_counts_arm_x86": same, "failures": problems,
              "runs": [asdict(r) for r in runs], "wall_s": round(time.monotonic() - began, 1)}
    out = args.out or args.work / "result.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"   results: {out}")
    if problems:
        print(f"FAIL: {len(problems)} problems in {len(runs)} runs:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"OK: {len(runs)} of {len(runs)} answers equal the target's greedy answer token for token, every run "
          f"drafted, and at accuracy level 0 ARM drafted and accepted what x86 did on every question")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
