"""Run exported graphs with numpy and onnxruntime only (no torch): the exporter's
reference execution, used by the parity stage and by the torch-free artifact test.

``OnnxVLM`` chains ``vision.onnx`` -> embedding table (image-token rows replaced by the
visual tokens) -> ``decoder.onnx`` with an explicit KV cache. ``forward`` runs one
chunk (prefill, one token or several); ``greedy`` decodes with the cache, like
``generate(do_sample=False)`` with ``min_new_tokens`` honoured by masking EOS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from covspec.protocol.manifest import load_manifest


def session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxVLM:
    """Vision + decoder graphs and the embedding table of one exported draft."""

    def __init__(self, vision_path, decoder_path, embed_tokens: np.ndarray, image_token_id: int,
                 eos_ids: list[int], past_names: list[str], num_kv_heads: int, head_dim: int):
        self.vision = session(vision_path)
        self.decoder = session(decoder_path)
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id
        self.eos_ids = list(eos_ids)
        self.past_names = past_names
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    @classmethod
    def from_artifact(cls, folder: str | Path) -> OnnxVLM:
        manifest = load_manifest(folder)
        folder = Path(folder)
        dec = manifest.decoder
        return cls(manifest.graph_path(folder, "vision"), manifest.graph_path(folder, "decoder"),
                   np.load(folder / manifest.embedding["file"], allow_pickle=False),
                   manifest.tokenizer["image_token_id"], manifest.tokenizer["eos_ids"],
                   dec["past_input_names"], dec["num_kv_heads"], dec["head_dim"])

    def encode_image(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_values [B,3,H,W]`` -> ``image_features [B,N,D]``, ``activity [B,N]``."""
        features, activity = self.vision.run(None, {"pixel_values": pixel_values.astype(np.float32)})
        return features, activity

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        """Token embeddings ``[B,T,D]`` with the image-token rows replaced, in order."""
        embeds = self.embed_tokens[input_ids]
        slots = input_ids == self.image_token_id
        embeds[slots] = image_features.reshape(-1, image_features.shape[-1])[: int(slots.sum())]
        return embeds

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def forward(self, embeds: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]):
        """One decoder chunk: ``embeds [B,S,D]`` at ``position_ids [B,S]`` after ``cache``.

        Returns ``(logits [B,S,V], new cache)``.
        """
        batch, query = embeds.shape[:2]
        past = cache[0].shape[2]
        feed = {"inputs_embeds": embeds.astype(np.float32),
                "attention_mask": np.ones((batch, past + query), np.int64),
                "position_ids": position_ids.astype(np.int64), **dict(zip(self.past_names, cache))}
        logits, *present = self.decoder.run(None, feed)
        return logits, present

    def prefill_logits(self, input_ids: np.ndarray, pixel_values: np.ndarray, split: int = 0) -> np.ndarray:
        """Logits ``[B,T,V]`` for the whole prompt; ``split`` > 0 runs the last ``split``
        tokens as a second chunk on the cache of the first (exercises past > 0)."""
        features, _ = self.encode_image(pixel_values)
        embeds = self.embed(input_ids, features)
        batch, length = input_ids.shape
        positions = np.broadcast_to(np.arange(length), (batch, length))
        cut = length - split
        logits, cache = self.forward(embeds[:, :cut], positions[:, :cut], self.empty_cache(batch))
        if split:
            tail, _ = self.forward(embeds[:, cut:], positions[:, cut:], cache)
            logits = np.concatenate([logits, tail], axis=1)
        return logits

    def greedy(self, input_ids: np.ndarray, pixel_values: np.ndarray, max_new_tokens: int,
               min_new_tokens: int = 0) -> list[int]:
        """Greedy tokens for one prompt ``input_ids [1,T]``, decoded with the KV cache."""
        features, _ = self.encode_image(pixel_values)
        embeds = self.embed(input_ids, features)
        length = input_ids.shape[1]
        logits, cache = self.forward(embeds, np.arange(length)[None], self.empty_cache(1))
        tokens: list[int] = []
        while True:
            scores = logits[0, -1].copy()
            if len(tokens) < min_new_tokens:
                scores[self.eos_ids] = -np.inf
            token = int(scores.argmax())
            tokens.append(token)
            if token in self.eos_ids or len(tokens) >= max_new_tokens:
                return tokens
            step = self.embed_tokens[[[token]]]
            logits, cache = self.forward(step, np.array([[length + len(tokens) - 1]]), cache)
