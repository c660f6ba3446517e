"""Load a `covspec export` artifact folder for the device.

``DraftArtifact.load`` checks the manifest (format version, every file's sha256)
before anything runs, then opens the token embedding table (memory-mapped) and the
tokenizer, builds the device half of the family the manifest names (``family``:
image preprocessing, prompt layout, draft context) and holds each graph as a
``Graph``: an onnxruntime session opened when first used (or at once, ``open``).

Memory (``lean``): by default every graph is opened at load, so a broken graph is
an error before anything else runs, and stays open (a process that answers many
images). A ``lean`` artifact opens each graph when it is first used and closes the
vision graph once it has encoded an image (``encode_image``, which also closes the
decoder before it starts: a new image replaces the draft's context), giving the
freed pages back (``covspec.protocol.heap.release_heap``), so the vision tower and the decoder are
never in memory together and the process peaks near the larger of the two instead
of their sum. The price is opening both graphs again for every image; a one-shot
``covspec device run`` opens each once either way.
Numpy, onnxruntime and tokenizers only.

``interrupted()`` is a context in which every run of the artifact's graphs (one under
way included: onnxruntime's ``RunOptions.terminate``) and every padding of a regime
ends at once, raising in the thread that runs it: a generation whose answer is
complete abandons its draft's prefill this way instead of waiting for it.

``run_vision`` feeds the vision graph what the family's preprocessing produced,
after checking every input's rank and fixed sizes against the graph: a
preprocessing that does not match its graph is an ``ArtifactError`` that says so,
never an onnxruntime traceback. ``DraftArtifact.embed`` looks up token embeddings;
an id beyond the draft's table (a target whose vocabulary has more padding rows
than the draft's) is embedded as the pad token, which only the draft sees.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from covspec.families import DeviceHalf, UnsupportedModelError, family_named
from covspec.families.chat import ChatTurns, ConversationError, History, check_history
from covspec.protocol.heap import release_heap
from covspec.protocol.manifest import ArtifactError, Manifest, load_manifest
from covspec.regime.pacing import NO_PACING
from covspec.runtime_device.embedding import QuantizedTable, load_table

GRAPHS = ("vision", "scorer", "decoder")


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def open_graph(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    """An onnxruntime CPU session on an ONNX or ORT graph file; ``ArtifactError`` if it cannot load."""
    path = Path(path)
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise ArtifactError(f"{path.name}: onnxruntime cannot load it ({exc}).") from None


class Graph:
    """An artifact graph: its onnxruntime session, opened when first used.

    Stands in for the session (``run``, ``get_inputs``, ... pass through), so the code
    that runs a graph never knows whether it was open before. ``close`` drops the
    session and gives its memory back; the next use opens it again.
    """

    def __init__(self, path: str | Path, threads: int):
        self.path, self.threads = Path(path), threads
        self._session: ort.InferenceSession | None = None
        self.run_options = ort.RunOptions()     # its ``terminate`` ends the graph's runs (``interrupted``)

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def open(self) -> ort.InferenceSession:
        if self._session is None:
            self._session = open_graph(self.path, self.threads)
            release_heap()          # the parsed graph file's buffers, freed once the session is built
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session = None
            release_heap()

    def run(self, output_names, feeds, run_options=None):
        return self.open().run(output_names, feeds, run_options or self.run_options)

    def __getattr__(self, name: str):
        if name.startswith("_"):       # private and special names (copy, pickle) never open a session
            raise AttributeError(name)
        return getattr(self.open(), name)


def run_vision(vision: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The vision graph on the graph's inputs among ``feeds`` -> (image_features, activity),
    as the graph returns them; ``ArtifactError`` if an input is missing or its rank or a
    fixed size differs from the graph's."""
    graph_feeds = {}
    for spec in vision.get_inputs():
        if spec.name not in feeds:
            raise ArtifactError(f"the image preprocessing produced no {spec.name!r}, an input of the vision graph "
                                f"(it produced {', '.join(sorted(feeds))}).")
        value = feeds[spec.name]
        fixed = [dim if isinstance(dim, int) else None for dim in spec.shape]
        if value.ndim != len(fixed) or any(want is not None and want != got for want, got in zip(fixed, value.shape)):
            shown = ", ".join(str(dim) if dim is not None else str(name or "?") for dim, name in zip(fixed, spec.shape))
            raise ArtifactError(f"the image preprocessing produced {spec.name} of shape {list(value.shape)}, but "
                                f"the vision graph takes [{shown}]: the artifact's preprocessing does not match "
                                "its vision graph (re-export the artifact with this covspec).")
        graph_feeds[spec.name] = value
    features, activity = vision.run(["image_features", "activity"], graph_feeds)
    return features, activity


def frame_count(feeds: dict[str, np.ndarray]) -> int:
    """Tiles or frames in the vision inputs: the leading sizes of the pixel array (the
    input of the most dimensions, four or more: [..., channels, height, width]); 1 for
    inputs of patches already flattened (e.g. Qwen2-VL's)."""
    pixels = max(feeds.values(), key=lambda value: getattr(value, "ndim", 0), default=None)
    if pixels is None or pixels.ndim < 4:
        return 1
    return max(1, int(np.prod(pixels.shape[:-3])))


@dataclass
class DraftArtifact:
    folder: Path
    manifest: Manifest
    vision: Graph
    scorer: Graph
    decoder: Graph
    embed_tokens: np.ndarray | QuantizedTable   # [V, D]; lookups give float32 rows
    tokenizer: Tokenizer
    family: DeviceHalf                # the device half of the artifact's model family
    lean: bool = False                # graphs opened when first used; the vision graph closed after each image
    pacing: object = NO_PACING        # a regime's DevicePacing: vision and decoder runs padded to the phone's time

    @classmethod
    def load(cls, folder: str | Path, threads: int = 2, verify_hashes: bool = True,
             lean: bool = False, pacing=NO_PACING) -> DraftArtifact:
        folder = Path(folder)
        manifest = load_manifest(folder, verify_hashes=verify_hashes)
        try:
            family = family_named(manifest.source["family"])
        except UnsupportedModelError as exc:
            raise ArtifactError(f"manifest.json: field 'source.family': {exc}") from None
        embed = load_table(folder, manifest.embedding)      # memory-mapped, in the artifact's precision
        tokenizer = Tokenizer.from_file(str(folder / manifest.tokenizer["file"]))
        device_half = family.device(image=manifest.image, tokenizer_section=manifest.tokenizer,
                                    prompt_template=manifest.prompt_template, tokenizer=tokenizer,
                                    embed_tokens=embed)
        graphs = [Graph(manifest.graph_path(folder, name), threads) for name in GRAPHS]
        if not lean:
            for graph in graphs:
                graph.open()
        return cls(folder, manifest, *graphs, embed, tokenizer, device_half, lean, pacing)

    def encode_image(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The vision graph on the family's preprocessed ``feeds`` (``run_vision``; in several
        runs where the family splits them, ``vision_runs``); a lean artifact closes the
        decoder first (a new image replaces the draft's context) and the vision graph
        afterwards. Under a regime the runs together take the phone's time for their frames."""
        if self.lean:
            self.decoder.close()
        runs = self.family.vision_runs(feeds)
        try:
            with self.pacing.vision(frame_count(feeds)):
                if len(runs) == 1:
                    return run_vision(self.vision, dict(runs[0]))
                parts = [run_vision(self.vision, dict(part)) for part in runs]
                return tuple(np.concatenate([part[i] for part in parts], axis=1) for i in range(2))
        finally:
            if self.lean:
                self.vision.close()

    @contextmanager
    def interrupted(self):
        """Within: every graph run (under way or new) and every regime padding ends at once."""
        graphs = (self.vision, self.scorer, self.decoder)
        for graph in graphs:
            graph.run_options.terminate = True
        self.pacing.pacer.interrupt()
        try:
            yield
        finally:
            for graph in graphs:
                graph.run_options.terminate = False
            self.pacing.pacer.resume()

    @property
    def eos_ids(self) -> set[int]:
        return set(self.manifest.tokenizer["eos_ids"])

    @property
    def vocab_hash(self) -> str:
        return self.manifest.tokenizer["vocab_hash"]

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Token embeddings [n, D] for ids [n]; ids beyond the table take the pad token's row."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.embed_tokens.shape[0]
        if ids.size and ids.max() >= rows:
            ids = np.where(ids < rows, ids, int(self.manifest.tokenizer.get("pad_id") or 0))
        return self.embed_tokens[ids]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def conversation_template(self, history: History) -> str:
        """The prompt template of the question after ``history`` (earlier (question, answer)
        turns), as the draft's chat template renders the conversation (``families/chat.py``);
        ``ConversationError`` for an artifact without one or a text with the image token."""
        turns = ChatTurns.from_dict(self.manifest.conversation)
        if turns is None:
            raise ConversationError(f"the artifact {self.folder} has no conversation template (exported before "
                                    "covspec rendered conversations, or its chat template renders none); re-export "
                                    "it with this covspec, or ask each question on its own.")
        image_token = self.tokenizer.id_to_token(int(self.manifest.tokenizer["image_token_id"]))
        check_history(history, [image_token or ""])
        return turns.template(history)
