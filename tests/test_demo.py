"""`covspec demo`, the first thing a newcomer runs: every answer streams both ways, is
checked against target-only, and the speedup is the ratio of medians over the repeats."""

from __future__ import annotations

import re

from click.testing import CliRunner

from covspec.cli.demo_cmd import demo


def test_the_demo_streams_checks_and_times_every_answer(toy_draft_int8):
    result = CliRunner().invoke(demo, ["--artifacts", str(toy_draft_int8), "--questions", "1",
                                       "--repeats", "2", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    questions = result.output.count("Q: ")
    assert questions > 0
    assert result.output.count("  covspec:     ") == result.output.count("  target only: ") == questions
    verdicts = re.findall(r"  (identical|DIFFERENT) \| covspec \d+ tok/s .* -> (\d+\.\d+)x", result.output)
    assert [verdict for verdict, _ in verdicts] == ["identical"] * questions
    assert f"{questions}/{questions} answers identical" in result.output
    assert "medians of 2 timings per answer each way" in result.output
