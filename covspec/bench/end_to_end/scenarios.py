"""The scenarios `covspec bench` compares, each a name and how the device runs it.

- ``target-only``: the baseline of the paper: the device sends question and image,
  the edge generates alone and streams the tokens.
- ``vanilla``: conventional device-edge speculative decoding: fixed draft length 4,
  dense distributions on the wire, no pruning, no pipelining, no branching.
- ``covspec``: every feature on (the device's defaults).
- ``covspec-edge-led`` / ``covspec-device-led``: CoVSpec with the target stepping by
  itself while chunks jump it ahead (edge-led, protocol v2), or waiting for every
  chunk (device-led); the default is one of them.
- ``covspec-no-<feature>``: CoVSpec with one feature switched off; the adaptive
  policy, pipelining and branches belong to the device-led loop, so their ablations
  are taken from ``covspec-device-led``.
- ``assisted``: transformers' assisted generation with the same draft and target in
  PyTorch on one machine (the single-machine anchor; no link involved).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from covspec.runtime_device.options import DraftingOptions, GenerationSettings

COVSPEC = DraftingOptions()


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str                                   # "target_only", "speculative" or "assisted"
    options: DraftingOptions | None = None
    prune_target: bool = False                  # opt-in, NOT exact: the target keeps the draft's tokens

    def settings(self, base: GenerationSettings) -> GenerationSettings:
        """The run's settings: ``base`` with this scenario's output-changing choices."""
        return dataclasses.replace(base, prune_target=self.prune_target)


def standard_scenarios(keep_ratio: float) -> list[Scenario]:
    full = dataclasses.replace(COVSPEC, keep_ratio=keep_ratio)
    device_led = dataclasses.replace(full, lead="device")
    return [
        Scenario("target-only", "target_only"),
        Scenario("vanilla", "speculative", DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False,
                                                           branches=0, wire="dense", keep_ratio=1.0)),
        Scenario("covspec", "speculative", full),
        Scenario("covspec-edge-led", "speculative", dataclasses.replace(full, lead="edge")),
        Scenario("covspec-device-led", "speculative", device_led),
        Scenario("covspec-no-pruning", "speculative", dataclasses.replace(full, keep_ratio=1.0)),
        Scenario("covspec-no-adaptive", "speculative", dataclasses.replace(device_led, policy="fixed", draft_len=4)),
        Scenario("covspec-no-pipeline", "speculative", dataclasses.replace(device_led, pipeline=False)),
        Scenario("covspec-no-branches", "speculative", dataclasses.replace(device_led, branches=0)),
        Scenario("covspec-dense-wire", "speculative", dataclasses.replace(full, wire="dense")),
        Scenario("assisted", "assisted"),
    ]
