"""Benchmarks: every claim of the project as a number, one room per thing measured.

- ``harness``: what every bench stands on: the edge child process and one-shot
  requests to it, the emulated link, well-behaved devices, the questions, timing,
  memory sampling, the sections of BENCHMARKS.md;
- ``end_to_end``: device and edge over emulated links (``covspec bench run``,
  ``pruning``, ``drafting``, and under emulated deployment regimes: ``regime``) and the
  wire traffic at real vocabulary sizes (``wire``);
- ``capacity``: N devices against one edge (``covspec bench load``), with replay devices;
- ``reliability``: hostile messages, load and faults, and a hostile edge against the
  device (``covspec bench reliability``);
- ``device``: the draft on the device at real size (``covspec bench device``), its
  anchors (onnxruntime-genai, llama.cpp), quantization quality, and arm64;
- ``families``: per-family figures on tiny configs (``covspec bench families``);
- ``gpu``: the Triton verifier and the edge on a GPU (``covspec bench gpu``).

Each ``covspec bench X`` command is ``covspec/cli/bench_X_cmd.py``. ARCHITECTURE.md,
"Where a change lands", says where a new benchmark goes.
"""
