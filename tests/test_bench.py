"""`covspec bench run --quick` produces a valid report with every scenario, and every
device-led scenario drafted (its acceptance measures drafts, not an edge that finished alone)."""

import json
import subprocess
import sys

from covspec.bench.end_to_end.scenarios import standard_scenarios


def test_quick_bench_reports_every_scenario(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "covspec.cli.main", "bench", "run", "--quick", "--no-markdown", "--out", str(out),
         "--artifacts", str(tmp_path / "artifacts")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench-quick.json").read_text())
    scenarios = {row["scenario"] for row in report["rows"]}
    assert scenarios == {s.name for s in standard_scenarios(1.0)}
    by_name = {row["scenario"]: row for row in report["rows"]}
    for name, row in by_name.items():
        assert row["tokens_per_s"] > 0, name
        assert row["identical"] == 1.0, f"{name} changed the target's output"
    device_led = [s.name for s in standard_scenarios(1.0) if s.options is not None and s.options.lead == "device"]
    assert {"vanilla", "covspec-device-led", "covspec-no-adaptive"} <= set(device_led)
    for name in device_led:
        assert by_name[name]["drafted"] > 0 and 0 < by_name[name]["accepted"] <= by_name[name]["drafted"], name
    # The compact wire sends far fewer bytes per token than the dense baseline: compared where
    # both drafted for sure (device-led; edge-led, a short answer may come before any draft).
    assert by_name["covspec-device-led"]["bytes_up_per_token"] < by_name["vanilla"]["bytes_up_per_token"]


def test_markdown_section_is_replaced_on_rerun(tmp_path):
    from covspec.bench.harness.sections import append_markdown

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nold b\n")
    append_markdown(path, "A", "covspec bench a", "new a")
    append_markdown(path, "C", "covspec bench c", "new c")
    text = path.read_text()
    assert text.count("## A\n") == 1 and "old a" not in text and "new a" in text
    assert text.index("## A") < text.index("## B") < text.index("## C") and "old b" in text
