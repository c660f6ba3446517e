"""Co-inference on the device: one draft, one edge, generation after generation.

``CoInference`` is one device: a draft (``draft_model.DraftModel``: an artifact run with
onnxruntime, or any other) and a connection to an edge. ``CoInference.generate`` yields
the list of tokens each reply commits, so a caller can stream text as it is committed;
it knows nothing about text or terminals. Every generation is the one device loop
(``loop.Generation``: open, prefill, commit, reopen, close, statistics, trace) led by a
strategy, chosen here (``strategy_for``, where a new strategy is registered):

- ``edge_led.EdgeLed`` when ``DraftingOptions.edge_led`` says so (greedy by default):
  the edge generates by itself and the device's chunks jump it ahead; with
  ``lead="auto"`` it hands the lead to device-led rounds on the same session once they
  pay (its ``successor``);
- ``device_led.DeviceLed`` otherwise: the target waits for the device's chunks.

The target-only baseline (``target_only.generate_target_only``) runs the same loop
without a draft. The device keeps one drafting policy and one ``LeadPlanner`` per set
of options across generations, so what they learn carries over.

The committed sequence is owned by the edge (it verifies, corrects and stops); the
device only ever appends what a verdict says. Everything else the device does is
speculation that can only save time, never change the output (``DraftingOptions``):
pruning, the drafting policy, pipelining, branching, the wire format. The one opt-in
exception, labelled NOT exact, is ``GenerationSettings.prune_target``.

When the edge restarts or stops answering, the device reopens the session with every
committed token, so no committed token is lost; if the edge stays away it raises
``EdgeUnreachable`` after the committed tokens were yielded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient
from covspec.runtime_device.device_led import DeviceLed
from covspec.runtime_device.draft_model import ArtifactDraft, DraftModel
from covspec.runtime_device.edge_led import EdgeLed
from covspec.runtime_device.lead_planner import VERIFIED_LEN, LeadPlanner
from covspec.runtime_device.loop import Generation, Strategy
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.policy import DraftPolicy
from covspec.runtime_device.session import Turn
from covspec.runtime_device.stats import GenerationStats


class CoInference:
    """One device: a draft (an artifact, or any ``DraftModel``) and a connection to an edge."""

    def __init__(self, draft: DraftArtifact | DraftModel, client: EdgeClient):
        self.draft = ArtifactDraft(draft) if isinstance(draft, DraftArtifact) else draft
        self.client = client
        self._policies: dict[DraftingOptions, DraftPolicy] = {}
        self._lead_planners: dict[DraftingOptions, LeadPlanner] = {}

    def policy_for(self, options: DraftingOptions) -> DraftPolicy:
        """The drafting policy for ``options``, kept across generations so that what it
        learns (acceptance by confidence, draft, link and verify timings) carries over."""
        if options not in self._policies:
            self._policies[options] = options.make_policy()
        return self._policies[options]

    def lead_planner_for(self, options: DraftingOptions) -> LeadPlanner:
        """The edge-led chunk policy for ``options``, kept across generations like ``policy_for``."""
        if options not in self._lead_planners:
            self._lead_planners[options] = LeadPlanner(VERIFIED_LEN if options.policy == "adaptive"
                                                      else options.draft_len)
        return self._lead_planners[options]

    def generate(self, image_bytes: bytes, question: str, settings: GenerationSettings,
                 options: DraftingOptions = DraftingOptions(), stats: GenerationStats | None = None,
                 trace: Callable[[dict], None] | None = None, turn: Turn | None = None) -> Iterator[list[int]]:
        """The tokens each verdict commits, for ``question`` about the image; ``turn``: its place
        in a conversation (``conversation.Conversation``), whose session it continues."""
        stats = stats if stats is not None else GenerationStats()
        trace = trace or (lambda event: None)
        return Generation(self.client, self.draft, image_bytes, question, settings, options, stats, trace,
                          self.strategy_for(settings, options), turn=turn).tokens()

    def strategy_for(self, settings: GenerationSettings, options: DraftingOptions) -> Strategy:
        """Who leads a generation with ``settings`` and ``options``."""
        def device_led() -> DeviceLed:
            return DeviceLed(self.policy_for(options), options.branches)

        if not options.edge_led(settings):
            return device_led()
        return EdgeLed(self.lead_planner_for(options), device_led if options.lead == "auto" else None)
