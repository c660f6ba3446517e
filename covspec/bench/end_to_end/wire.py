"""Wire traffic at real vocabulary sizes: compact (protocol v1) vs dense (baseline).

Tiny random LLaVA pairs with vocabularies of 32,000, 151,936 and 262,144 tokens (the
last is Gemma 3's) run real sessions against a real edge; the client counts the bytes
of every verify it sends and every result it receives, per message type, so the
figures are what travels on the socket (frame payloads), not estimates. The device
leads (``lead="device"``, fixed chunks of 4) so that every session drafts: bytes per
drafted position are a measurement only when positions were drafted, and a
configuration that drafted nothing raises ``NothingDrafted``.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION = "what color is the circle ?"


def _png(seed: int) -> bytes:
    image = Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def measure_wire(vocab_sizes: list[int], sessions: int = 3, max_new_tokens: int = 16,
                 tick: Callable[[], None] = lambda: None) -> list[dict]:
    from covspec.export.pipeline import ExportOptions, export_model
    from covspec.hf.tiny import save_tiny_llava
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import EdgeClient
    from covspec.protocol.wire import CODECS
    from covspec.runtime_device.engine import CoInference
    from covspec.runtime_device.options import DraftingOptions, GenerationSettings
    from covspec.runtime_device.stats import GenerationStats, require_drafting
    from covspec.runtime_edge import EdgeServer, ServerConfig

    rows = []
    for vocab in vocab_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            save_tiny_llava(root / "draft", vocab_size=vocab, seed=0)
            save_tiny_llava(root / "target", vocab_size=vocab, seed=1)
            export_model(root / "draft", root / "artifact", ExportOptions(quant="fp32"))
            artifact = DraftArtifact.load(root / "artifact", threads=1)
            with EdgeServer(root / "target", ServerConfig(bind="tcp://127.0.0.1:*", threads=1)) as server:
                for mode, temperature in (("greedy", 0.0), ("sampling", 1.0)):
                    for wire in CODECS:
                        client = EdgeClient(server.address)
                        engine = CoInference(artifact, client)
                        options = DraftingOptions(lead="device", policy="fixed", draft_len=4, pipeline=False, branches=0,
                                                  wire=wire)
                        drafted = rounds = tokens = 0
                        for seed in range(sessions):
                            stats = GenerationStats()
                            settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          seed=seed)
                            for _ in engine.generate(_png(seed), QUESTION, settings, options, stats):
                                pass
                            drafted, rounds, tokens = drafted + stats.drafted, rounds + stats.rounds, \
                                tokens + stats.tokens
                        require_drafting(drafted, f"wire {wire}, {mode}, vocabulary {vocab}")
                        counted = client.bytes_by_type
                        client.close()
                        rows.append({"vocab": vocab, "mode": mode, "wire": wire, "drafted": drafted,
                                     "rounds": rounds, "tokens": tokens,
                                     "up_per_drafted": counted["up:verify"] / drafted,
                                     "down_per_verdict": counted["down:result"] / max(rounds, 1),
                                     "verify_bytes_per_token": (counted["up:verify"] + counted["down:result"])
                                     / max(tokens, 1)})
                        tick()
    return rows


def wire_table(rows: list[dict]) -> str:
    lines = ["| vocab | mode | wire | B up / drafted position | B down / verdict | B / generated token "
             "| reduction vs dense |", "|---|---|---|---|---|---|---|"]
    dense = {(r["vocab"], r["mode"]): r["verify_bytes_per_token"] for r in rows if r["wire"] == "dense"}
    for r in rows:
        reduction = 1 - r["verify_bytes_per_token"] / dense[(r["vocab"], r["mode"])]
        lines.append(f"| {r['vocab']:,} | {r['mode']} | {r['wire']} | {r['up_per_drafted']:,.0f} | "
                     f"{r['down_per_verdict']:,.0f} | {r['verify_bytes_per_token']:,.0f} | "
                     f"{'-' if r['wire'] == 'dense' else f'{reduction:.2%}'} |")
    return "\n".join(lines)
