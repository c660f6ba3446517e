"""What a generation is asked for (``GenerationSettings``: decides the output) and how
the device drafts it (``DraftingOptions``: decides only the speed, never the output).

Both are frozen dataclasses validated once, when built; a ``ValueError`` names the
first unusable value. The drafting policy and the wire format are looked up by name
in their registries (``policy.POLICIES``, ``covspec.protocol.wire.CODECS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from covspec.families import POSITIONS
from covspec.protocol.messages import SEED_RANGE
from covspec.protocol.sampling import SamplingParams
from covspec.protocol.wire import CODECS, codec_named
from covspec.runtime_device.policy import POLICIES
from covspec.runtime_device.pruning import METHODS

# Who sets the pace: the edge's own steps (edge_led), or the device's chunks. "auto" is,
# when greedy, edge-led until the draft is ready and then device-led if the device's
# rounds would commit faster than the target alone (the hand-over of ``edge_led``: the
# first token and short answers come as fast as the edge alone, long answers at the
# device-led rounds' pace); when sampling, device-led, where a seed then reproduces the
# answer (edge-led sampling follows the target's distribution too, but which positions
# the target samples by itself depends on timing). "edge" never hands over.
LEADS = ("auto", "edge", "device")


@dataclass(frozen=True)
class GenerationSettings:
    """What the user asked for; these decide the output. ``temperature`` 0 is greedy.

    ``prune_target`` (opt-in, NOT exact) lets the edge target see only the visual
    tokens the draft kept, trading accuracy for edge prefill time.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    prune_target: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError("seed must be an unsigned 64-bit integer (0 <= seed < 2**64)")
        self.sampling.check()

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy


@dataclass(frozen=True)
class DraftingOptions:
    """How the device drafts; these decide only the speed, never the output."""

    lead: str = "auto"                     # edge: the target never waits (edge_led); device: it waits for chunks
    policy: str = "adaptive"
    draft_len: int = 4                     # the chunk length of the fixed policy
    max_draft_len: int = 12                # the adaptive policy's hard maximum
    pipeline: bool = True
    max_in_flight: int = 4                 # with pipelining: chunks awaiting a verdict at most
    branches: int = 2
    wire: str = "compact"
    keep_ratio: float | None = None       # None: the artifact's default
    keep_tokens: int | None = None
    selection: str = "covspec"
    reselect: bool = False                 # a follow-up question re-selects the kept visual tokens (re-prefill)
    positions: str = "original"            # kept visual tokens keep their original positions
    q_top_k: int = 8                       # compact wire, sampling: at most this many proposed ids
    q_mass: float = 0.999                  # per position, fewer once they hold this much of q
    reopen_attempts: int = 5

    def __post_init__(self) -> None:
        if self.lead not in LEADS:
            raise ValueError(f"lead must be one of {', '.join(LEADS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        if self.draft_len < 1 or self.max_draft_len < 1:
            raise ValueError("draft lengths must be >= 1")
        if self.branches < 0:
            raise ValueError("branches must be >= 0")
        if self.max_in_flight < 2:
            raise ValueError("max_in_flight must be >= 2 (one chunk and one pipelined)")
        if self.q_top_k < 1 or not 0 < self.q_mass <= 1:
            raise ValueError("q_top_k must be >= 1 and q_mass in (0, 1]")
        if self.wire not in CODECS:
            raise ValueError(f"wire must be one of {', '.join(CODECS)}")
        if self.selection not in METHODS:
            raise ValueError(f"selection must be one of {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}")

    def codec(self):
        """The wire format's codec, with the device's proposal settings."""
        return codec_named(self.wire, q_top_k=self.q_top_k, q_mass=self.q_mass)

    def edge_led(self, settings: GenerationSettings) -> bool:
        """Whether a generation with ``settings`` runs edge-led (``lead``; a pruned target,
        which opens only once the draft chose its tokens, is always device-led)."""
        if settings.prune_target:
            return False
        return self.lead == "edge" or (self.lead == "auto" and settings.greedy)

    def make_policy(self):
        return POLICIES[self.policy].from_options(self)
