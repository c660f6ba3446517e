"""Benchmark harness: link emulation, scenarios, reports (DESIGN.md section 11)."""
