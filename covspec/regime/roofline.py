"""What a call of a given shape takes on the regime's hardware (pure functions, seconds).

Device (``DeviceProfile``, milliseconds measured on the bench machine times its
``phone_factor``):

- ``vision_s(frames)``: one vision-tower run per tile or frame;
- ``decoder_s(rows, prefill)``: a prefill run costs ``prefill_token_ms`` a row; a decode
  run costs ``decode_step_ms`` for its first row and ``decode_row_ms`` for each further one.

Target (``TargetProfile``), one forward over a batch whose row b holds ``past[b]``
cached tokens and ``new[b]`` new ones::

    time = layers x layer_overhead
         + max(bytes / (bandwidth x bandwidth_efficiency), flops / (peak x compute_efficiency))
    bytes = weights + KV of every row's past and new tokens
    flops = 2 x params x sum(new) + 4 x layers x hidden x sum(new x (past + new))

so a forward is memory-bound (batching is nearly free) until the new tokens reach the
knee ``peak x ce / (bandwidth x be)`` tokens, and compute-bound beyond it. A prefill is
a forward with no past, plus the vision tower per image.
"""

from __future__ import annotations

from collections.abc import Sequence

from covspec.regime.profiles import DeviceProfile, TargetProfile


def vision_s(device: DeviceProfile, frames: int) -> float:
    return max(1, frames) * device.vision_frame_ms * device.phone_factor / 1000


def decoder_s(device: DeviceProfile, rows: int, prefill: bool) -> float:
    """One draft decoder run over ``rows`` rows (a prefill chunk, or a decode run)."""
    if prefill:
        ms = rows * device.prefill_token_ms
    else:
        ms = device.decode_step_ms + max(0, rows - 1) * device.decode_row_ms
    return ms * device.phone_factor / 1000


def kv_bytes_per_token(target: TargetProfile) -> float:
    return 2 * target.layers * target.kv_dim * target.bytes_per_param


def forward_s(target: TargetProfile, past: Sequence[int], new: Sequence[int]) -> float:
    """One target forward over rows with ``past[b]`` cached and ``new[b]`` new tokens."""
    assert len(past) == len(new) and len(new) > 0, "one past and one new count per row"
    params = target.params_b * 1e9
    weights = params * target.bytes_per_param
    kv = kv_bytes_per_token(target) * sum(p + n for p, n in zip(past, new))
    flops = 2 * params * sum(new) + 4 * target.layers * target.hidden * sum(n * (p + n) for p, n in zip(past, new))
    memory = (weights + kv) / (target.bandwidth_gbs * 1e9 * target.bandwidth_efficiency)
    compute = flops / (target.peak_tflops * 1e12 * target.compute_efficiency)
    return target.layers * target.layer_overhead_ms / 1000 + max(memory, compute)


def prefill_s(target: TargetProfile, tokens: int, images: int = 1) -> float:
    """The target's prefill of ``tokens`` context tokens holding ``images`` images."""
    return images * target.vision_ms / 1000 + forward_s(target, [0], [tokens])


def step_s(target: TargetProfile, context: int = 256) -> float:
    """One decode step of one session at ``context`` tokens: the target's time per token."""
    return forward_s(target, [context], [1])


def knee_tokens(target: TargetProfile) -> float:
    """New tokens per forward beyond which the forward is compute-bound."""
    return (target.peak_tflops * 1e12 * target.compute_efficiency) / \
        (target.bandwidth_gbs * 1e9 * target.bandwidth_efficiency / target.bytes_per_param)
