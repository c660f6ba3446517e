"""Shared test fixtures: torch blocked in a child, one torch thread, and the toy pair's artifacts
and greedy answers built once per session."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import covspec

# Prepended to a script so that importing torch or transformers raises ImportError,
# as on a phone where only the device extras are installed.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    for _name in ("torch", "transformers", "torchvision"):
        sys.modules[_name] = None
""")


def run_without_torch(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python where torch and transformers cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_torch():
    return run_without_torch


def torch_on_one_thread():
    """A module fixture body (``one_torch_thread = pytest.fixture(...)(torch_on_one_thread)``):
    tiny models run fastest on one torch thread, above all on a CPU shared with other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the toy pair, once per session --------------------------------------------------------------

TOY_INT8 = Path(covspec.__file__).parents[1] / "artifacts" / "toy-draft-int8"   # the CLI's default folder


@pytest.fixture(scope="session")
def toy_draft_fp32(tmp_path_factory) -> Path:
    """The bundled toy draft exported (fp32) once per test session; tests load it, never change it."""
    from covspec.export.pipeline import ExportOptions, export_model
    from covspec.toy.models import bundled_model_dir

    folder = tmp_path_factory.mktemp("toy-draft") / "toy-fp32"
    export_model(bundled_model_dir("draft"), folder, ExportOptions(quant="fp32"))
    return folder


@pytest.fixture(scope="session")
def toy_draft_int8() -> Path:
    """The toy draft's int8 device artifact as the CLI, the demo and the benchmarks use it
    (``artifacts/toy-draft-int8``, with parity prompts; exported only when missing or stale)."""
    from covspec.toy.artifacts import ensure_toy_artifacts

    return ensure_toy_artifacts(TOY_INT8, lambda line: None)


@pytest.fixture(scope="session")
def toy_set():
    """The 50 held-out toy questions and the toy target's greedy answers to them (64 new tokens at
    most; the first n tokens of an answer are its answer with n new tokens at most)."""
    from covspec.bench.harness.devices import greedy_references
    from covspec.bench.harness.workload import toy_questions
    from covspec.toy.models import bundled_model_dir

    questions = toy_questions(50)
    return {"questions": questions, "references": greedy_references(bundled_model_dir("target"), questions, 64)}
