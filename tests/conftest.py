"""Shared test fixtures."""

import subprocess
import sys
import textwrap

import pytest

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
