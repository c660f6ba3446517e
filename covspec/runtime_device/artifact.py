"""Load a `covspec export` artifact folder for the device.

``DraftArtifact.load`` checks the manifest (format version, every file's sha256)
before anything runs, then opens the onnxruntime sessions, the token embedding table
and the tokenizer. It also turns a question into the draft's prompt ids, expanding
the single image token into as many visual tokens as the draft keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from covspec.protocol.manifest import ArtifactError, Manifest, load_manifest


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


@dataclass
class PromptLayout:
    """The draft prompt split around its visual tokens: ids before and after the image."""

    before: list[int]
    after: list[int]


@dataclass
class DraftArtifact:
    folder: Path
    manifest: Manifest
    vision: ort.InferenceSession
    scorer: ort.InferenceSession
    decoder: ort.InferenceSession
    embed_tokens: np.ndarray          # [V, D] float32
    tokenizer: Tokenizer

    @classmethod
    def load(cls, folder: str | Path, threads: int = 2, verify_hashes: bool = True) -> DraftArtifact:
        folder = Path(folder)
        manifest = load_manifest(folder, verify_hashes=verify_hashes)
        options = session_options(threads)

        def open_graph(name: str) -> ort.InferenceSession:
            path = manifest.graph_path(folder, name)
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise ArtifactError(f"{path.name}: onnxruntime cannot load it ({exc}).") from None

        embed = np.load(folder / manifest.embedding["file"], allow_pickle=False)
        if list(embed.shape) != list(manifest.embedding["shape"]):
            raise ArtifactError(f"{manifest.embedding['file']}: shape {list(embed.shape)} differs from the "
                                f"manifest's {manifest.embedding['shape']}.")
        tokenizer = Tokenizer.from_file(str(folder / manifest.tokenizer["file"]))
        return cls(folder, manifest, open_graph("vision"), open_graph("scorer"), open_graph("decoder"),
                   embed.astype(np.float32, copy=False), tokenizer)

    @property
    def eos_ids(self) -> set[int]:
        return set(self.manifest.tokenizer["eos_ids"])

    @property
    def vocab_hash(self) -> str:
        return self.manifest.tokenizer["vocab_hash"]

    def prompt_layout(self, question: str) -> PromptLayout:
        """Tokenize the prompt template filled with ``question`` and split it at the image."""
        text = self.manifest.prompt_template.replace("{question}", question.strip())
        ids = self.tokenizer.encode(text).ids  # as the processor does, special tokens included
        image_id = self.manifest.tokenizer["image_token_id"]
        if ids.count(image_id) != 1:
            raise ArtifactError("the prompt template must contain exactly one image token.")
        split = ids.index(image_id)
        return PromptLayout(before=ids[:split], after=ids[split + 1:])

    def embed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Token embeddings [n, D] for ids [n]."""
        return self.embed_tokens[np.asarray(ids, dtype=np.int64)]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
