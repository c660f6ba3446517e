"""The target VLM behind the edge: context building, prefill, cached forwards, rollback.

``TargetModel`` owns a transformers model and its processor and does tensor work
only. It knows nothing about sessions, sockets, sampling or stopping: callers get
float32 logits as numpy arrays and decide themselves (``session.py``). All calls
must come from one thread (the server's model owner), under ``torch.inference_mode``.

KV-cache contract: ``prefill`` returns a cache holding every input token; ``extend``
appends its tokens to the cache and returns one logits row per token (row i scores
the token after ``tokens[i]``); ``rollback(cache, length)`` crops the cache back to
its first ``length`` tokens.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covspec.hf.folder import IMAGE_TOKEN, load_llava, prompt_template
from covspec.protocol.vocab import vocab_hash
from covspec.runtime_edge.config import ConfigError
from covspec.runtime_edge.errors import BAD_FIELD, BAD_IMAGE, EdgeError


@dataclass
class Context:
    """The processed prompt of one session: model inputs on the model's device."""

    inputs: dict[str, Any]   # input_ids [1, L], attention_mask [1, L], pixel_values [1, 3, H, W]
    length: int              # L: prompt tokens with the image placeholder expanded (kept tokens only)
    keep: Any = None         # opt-in pruned target: LongTensor [K] of kept visual token indices


def decode_image(data: bytes, max_pixels: int):
    """An RGB PIL image from encoded bytes (PNG, JPEG, ...); EdgeError ``bad_image`` otherwise.

    The pixel count is checked from the header before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise EdgeError(BAD_IMAGE, f"the image is {width}x{height} pixels; this edge accepts at most "
                                       f"{max_pixels} pixels, so downscale it before sending.")
        return image.convert("RGB")
    except EdgeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EdgeError(BAD_IMAGE, f"the image bytes do not decode as an image ({exc}); send PNG or JPEG bytes.") from None


class TargetModel:
    """A LLaVA-architecture target on one device, in one dtype."""

    def __init__(self, model, processor, device: str):
        self.model = model
        self.processor = processor
        self.device = device
        self.template = prompt_template(processor)
        self.vocab_hash = vocab_hash(processor.tokenizer.get_vocab())
        # The logits width; may exceed the tokenizer (a padded embedding matrix).
        self.vocab_size = int(model.get_output_embeddings().out_features)
        self.eos_ids = frozenset(_eos_ids(model, processor))
        self.max_positions = int(getattr(model.config.text_config, "max_position_embeddings", 1 << 30))

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> "TargetModel":
        """Load a local model folder (``covspec.hf.folder.load_llava``); nothing is fetched."""
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
        model, processor = load_llava(path, device=device, dtype=dtype)
        return cls(model, processor, device)

    def context(self, question: str, image, keep: Sequence[int] | None = None) -> Context:
        """Fill the chat template with ``question`` and process it with ``image``.

        With ``keep`` (the opt-in pruned target, not exact), only those visual tokens
        enter the context, renumbered contiguously.
        """
        if IMAGE_TOKEN in question:
            raise EdgeError(BAD_FIELD, f"the prompt contains {IMAGE_TOKEN!r}; send the question text only, "
                                       "the edge places the image itself.")
        prompt = self.template.format(question=question) if "{question}" in self.template else self.template
        try:
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as exc:
            raise EdgeError(BAD_FIELD, f"the prompt and image could not be processed ({exc}).") from None
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        length = int(inputs["input_ids"].shape[1])
        if keep is None:
            return Context(inputs=inputs, length=length)
        import torch

        visual = int((inputs["input_ids"][0] == self.model.config.image_token_id).sum())
        keep = sorted({int(i) for i in keep})
        if keep[0] < 0 or keep[-1] >= visual:
            raise EdgeError(BAD_FIELD, f"target_keep indexes visual tokens 0..{visual - 1}; got {keep[0]}..{keep[-1]} "
                                       "(the target's visual grid must match the draft's).")
        return Context(inputs=inputs, length=length - visual + len(keep),
                       keep=torch.tensor(keep, dtype=torch.long, device=self.device))

    def prefill(self, context: Context, committed: Sequence[int] = ()) -> tuple[Any, np.ndarray]:
        """Run image + prompt (+ ``committed`` tokens, on a reopen) -> (cache, logits [V]).

        The logits score the token after the last input; the cache holds every input.
        """
        import torch

        inputs = dict(context.inputs)
        if context.keep is not None:
            inputs = self._pruned_inputs(inputs, context.keep)
        if committed and "inputs_embeds" in inputs:
            extra = torch.tensor([list(committed)], dtype=torch.long, device=self.device)
            embeds = self.model.get_input_embeddings()(extra)
            inputs["inputs_embeds"] = torch.cat([inputs["inputs_embeds"], embeds], dim=1)
            inputs["attention_mask"] = torch.ones(inputs["inputs_embeds"].shape[:2], dtype=torch.long,
                                                  device=self.device)
        elif committed:
            extra = torch.tensor([list(committed)], dtype=inputs["input_ids"].dtype, device=self.device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.cache, _to_numpy(out.logits[0, -1])

    def _pruned_inputs(self, inputs: dict[str, Any], keep) -> dict[str, Any]:
        """inputs_embeds with only the kept visual tokens (positions renumbered contiguously)."""
        import torch

        ids = inputs["input_ids"][0]
        is_image = ids == self.model.config.image_token_id
        features = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features
        features = features.reshape(-1, features.shape[-1])[keep]                       # [K, D]
        start = int(torch.nonzero(is_image)[0])
        text = self.model.get_input_embeddings()(ids[None])[0]                          # [L, D]
        visual = int(is_image.sum())
        embeds = torch.cat([text[:start], features.to(text.dtype), text[start + visual:]])[None]
        return {"inputs_embeds": embeds,
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)}

    def extend(self, cache, tokens: Sequence[int]) -> np.ndarray:
        """One cached forward over ``tokens`` -> logits [len(tokens), V]; the cache grows by len(tokens)."""
        import torch

        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=cache, use_cache=True)
        return _to_numpy(out.logits[0])

    @staticmethod
    def rollback(cache, length: int) -> None:
        """Crop ``cache`` to its first ``length`` tokens (no-op if it holds no more)."""
        drop = cache.get_seq_length() - length
        if drop > 0:
            cache.crop(-drop)   # transformers 5: a negative count drops that many tokens

    @staticmethod
    def cache_length(cache) -> int:
        return int(cache.get_seq_length())


def _to_numpy(logits) -> np.ndarray:
    return logits.float().cpu().numpy()


def _eos_ids(model, processor) -> set[int]:
    """EOS ids as ``generate`` uses them: the generation config first, then the configs, then the tokenizer."""
    for source in (model.generation_config.eos_token_id, model.config.text_config.eos_token_id,
                   processor.tokenizer.eos_token_id):
        if source is not None:
            return {int(source)} if isinstance(source, int) else {int(i) for i in source}
    return set()
