"""What one generation cost (``GenerationStats``, filled in as it runs) and where its
drafting decisions are traced (``trace_to_file``: one JSON line per event)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationStats:
    """What one generation cost; filled in as it runs."""

    tokens: int = 0
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)
    drafted: int = 0
    stale: int = 0
    branch_hits: int = 0
    branches_drafted: int = 0
    hidden_draft_s: float = 0.0            # drafting done while waiting that a hit put to use
    pipelined_hits: int = 0
    pipelined_misses: int = 0
    deepest_in_flight: int = 0             # most chunks awaiting a verdict at once
    reopens: int = 0
    kept_visual_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: float = 0.0
    device_prefill_s: float = 0.0
    edge_verify_ms: float = 0.0
    edge_prefill_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted)) if self.accepted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "wall_s": round(self.wall_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "rounds": self.rounds,
                "mean_accepted": round(self.mean_accepted, 3), "drafted": self.drafted,
                "accepted": int(sum(self.accepted)), "stale": self.stale,
                "branch_hits": self.branch_hits, "branches_drafted": self.branches_drafted,
                "hidden_draft_ms": round(self.hidden_draft_s * 1000, 3),
                "pipelined_hits": self.pipelined_hits, "pipelined_misses": self.pipelined_misses,
                "deepest_in_flight": self.deepest_in_flight,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "ttft_s": round(self.ttft_s, 4), "device_prefill_s": round(self.device_prefill_s, 4),
                "kept_visual_tokens": self.kept_visual_tokens,
                "edge_verify_ms": round(self.edge_verify_ms, 2), "edge_prefill_ms": round(self.edge_prefill_ms, 2),
                "reopens": self.reopens}


def trace_to_file(path) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """A trace sink writing one JSON line per event, and its closer."""
    handle = open(path, "a", encoding="utf-8")
    began = time.perf_counter()

    def write(event: dict) -> None:
        handle.write(json.dumps({"t_ms": round((time.perf_counter() - began) * 1000, 3), **event}) + "\n")

    return write, handle.close
