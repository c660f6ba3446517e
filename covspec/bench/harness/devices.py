"""Well-behaved devices for the benchmarks (reliability, capacity, arm64): real
``CoInference`` sessions whose every answer is checked against the target's own greedy answer.

``greedy_references`` computes those answers in this process (transformers'
``generate`` on the target folder, the answer the edge must reproduce token for
token). ``DeviceLoop`` is one device in a thread: it answers questions back to back
until its ``stop`` event is set (the answer in progress is finished), and records each
``Answer``: correct or not, tokens, latency, reopens, or the error that ended it (and
how long the generation had gone without a token when it ended, to hold against its
patience), and whether what it committed strayed from the target's answer (a wrong
token, or one committed twice). It never raises; a failed answer is an answer that is
not correct.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from covspec.bench.harness.workload import Question
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import EdgeClient, Backoff
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.stats import GenerationStats


def greedy_references(target_dir: Path, questions: list[Question], max_new_tokens: int) -> list[list[int]]:
    """The target's greedy answer (generated token ids) to each question."""
    import io

    import torch
    from PIL import Image

    from covspec.families import family_for_folder

    family = family_for_folder(target_dir)
    model, processor = family.load(target_dir)
    prompting = family.target(model, processor)
    answers = []
    with torch.inference_mode():
        for question in questions:
            inputs = prompting.context(question.question, Image.open(io.BytesIO(question.image_png))).inputs
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            answers.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    return answers


def own_copy(artifact: DraftArtifact) -> DraftArtifact:
    """The same artifact opened again (one onnxruntime thread), for one device alone. Devices
    that share one artifact share its graphs' ``interrupted()``: a generation that abandons
    its draft's prefill then ends the runs of every other device too."""
    return DraftArtifact.load(artifact.folder, threads=1, verify_hashes=False, lean=artifact.lean)


@dataclass
class Answer:
    device: int
    question: int
    correct: bool
    tokens: int
    latency_s: float
    finished_at: float          # time.monotonic() when the answer was complete
    reopens: int
    error: str = ""
    stalled_s: float = 0.0      # from the last token (or the start) to the end
    diverged: bool = False      # the committed tokens are not a prefix of the target's answer


class DeviceLoop(threading.Thread):
    """One device answering questions back to back against ``address`` until ``stop``."""

    def __init__(self, index: int, artifact: DraftArtifact, address: str, questions: list[Question],
                 references: list[list[int]], stop: threading.Event, *,
                 settings: GenerationSettings = GenerationSettings(), options: DraftingOptions = DraftingOptions(),
                 backoff: Backoff = Backoff(timeout_s=10.0)):
        super().__init__(name=f"device-{index}", daemon=True)
        self.index, self.artifact, self.address = index, artifact, address
        self.questions, self.references, self.stop = questions, references, stop
        self.settings, self.options, self.backoff = settings, options, backoff
        self.answers: list[Answer] = []

    def run(self) -> None:
        client = EdgeClient(self.address, self.backoff)
        engine = CoInference(self.artifact, client)
        turn = self.index
        try:
            while not self.stop.is_set():
                which = turn % len(self.questions)
                turn += 1
                self.answers.append(self._answer(engine, which))
        finally:
            client.close()

    def _answer(self, engine: CoInference, which: int) -> Answer:
        question, stats = self.questions[which], GenerationStats()
        began = time.monotonic()
        tokens: list[int] = []
        error = ""
        last = began
        try:
            for chunk in engine.generate(question.image_png, question.question, self.settings, self.options, stats):
                tokens += chunk
                last = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a failed answer is recorded, never raised
            error = f"{type(exc).__name__}: {exc}"
        done = time.monotonic()
        reference = self.references[which]
        return Answer(self.index, which, not error and tokens == reference, len(tokens), done - began,
                      done, stats.reopens, error, round(done - last, 3), tokens != reference[:len(tokens)])


def run_devices(count: int, seconds: float, artifact: DraftArtifact, address: str, questions: list[Question],
                references: list[list[int]], *, during=None, **device_options) -> tuple[list[Answer], float]:
    """``count`` devices answering for ``seconds`` (then each finishes its answer in
    progress); ``during(stop)`` runs meanwhile in this thread. The answers, and the
    wall time from start to the last answer."""
    stop = threading.Event()
    loops = [DeviceLoop(i, artifact, address, questions, references, stop, **device_options) for i in range(count)]
    answers, _, wall = run_for(loops, stop, seconds, during)
    return answers, wall


def run_for(devices: list, stop: threading.Event, seconds: float, during=None) -> tuple[list, float, float]:
    """Start the ``devices`` (threads with ``answers``), let them answer for ``seconds``
    (``during(stop)`` runs meanwhile in this thread), set ``stop`` and wait for each to
    finish its answer in progress. Their answers, the monotonic start time, and the
    wall time to the last answer."""
    began = time.monotonic()
    for device in devices:
        device.start()
    if during is not None:
        during(stop)
    stop.wait(max(0.0, began + seconds - time.monotonic()))
    stop.set()
    for device in devices:
        device.join()
    return [a for device in devices for a in device.answers], began, time.monotonic() - began
