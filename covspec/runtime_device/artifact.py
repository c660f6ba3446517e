"""Load a `covspec export` artifact folder for the device.

``DraftArtifact.load`` checks the manifest (format version, every file's sha256)
before anything runs, then opens the onnxruntime sessions, the token embedding table
and the tokenizer, and builds the device half of the family the manifest names
(``family``: image preprocessing, prompt layout, draft context). Numpy,
onnxruntime and tokenizers only.

``run_vision`` feeds the vision graph what the family's preprocessing produced,
after checking every input's rank and fixed sizes against the graph: a
preprocessing that does not match its graph is an ``ArtifactError`` that says so,
never an onnxruntime traceback. ``DraftArtifact.embed`` looks up token embeddings;
an id beyond the draft's table (a target whose vocabulary has more padding rows
than the draft's) is embedded as the pad token, which only the draft sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from covspec.families import DeviceHalf, UnsupportedModelError, family_named
from covspec.protocol.manifest import ArtifactError, Manifest, load_manifest
from covspec.runtime_device.embedding import QuantizedTable, load_table


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


@dataclass
class DraftArtifact:
    folder: Path
    manifest: Manifest
    vision: ort.InferenceSession
    scorer: ort.InferenceSession
    decoder: ort.InferenceSession
    embed_tokens: np.ndarray | QuantizedTable   # [V, D]; lookups give float32 rows
    tokenizer: Tokenizer
    family: DeviceHalf                # the device half of the artifact's model family

    @classmethod
    def load(cls, folder: str | Path, threads: int = 2, verify_hashes: bool = True) -> DraftArtifact:
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
        graphs = [open_graph(manifest.graph_path(folder, name), threads) for name in ("vision", "scorer", "decoder")]
        return cls(folder, manifest, *graphs, embed, tokenizer, device_half)

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
