"""The LLaVA export half: flat-signature wrappers for tracing, and the manifest sections.

Supported: ``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower and
a Llama, Mistral or Qwen2 language model. Graphs:

- ``vision``: ``pixel_values [B,3,H,W] -> image_features [B,N,D], activity [B,N]``:
  the vision tower and projector exactly as the model selects them (feature layer(s),
  CLS dropped for the "default" strategy), and the attention the CLS token pays to
  each selected token (mean over heads, at the last layer the model uses). Towers
  without a CLS token (SigLIP) use the L2 norm of each token's feature instead.
- ``decoder``: the language model with a flat KV cache (``covspec.families.text_export``).

Torch and transformers; imported by the exporter only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from covspec.families.interface import GraphTrace, UnsupportedModelError
from covspec.families.common import fill_prompt, prompt_template
from covspec.families.text_export import FlatCacheDecoder, decoder_graph, decoder_spec, tokenizer_section

SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
TRACE_BATCH = 2      # trace with batch >= 2, so the batch size stays dynamic


class LlavaVision(nn.Module):
    """Vision tower + projector of a LLaVA model, with the per-token activity signal."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        core = getattr(self.tower, "vision_model", self.tower)  # transformers 5 flattens CLIP
        self.encoder_layers = core.encoder.layers
        self.num_heads = config.vision_config.num_attention_heads
        num_layers = len(self.encoder_layers)
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        # hidden_states[k] is the output of encoder layer k-1 (hidden_states[0]: embeddings).
        self.last_used = max(k if k >= 0 else num_layers + 1 + k for k in layers)
        self.has_cls = hasattr(core.embeddings, "class_embedding") and self.last_used > 0

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        pool = [hidden[k] for k in layers]
        if self.strategy == "default":
            pool = [h[:, 1:] for h in pool]
        features = self.projector(torch.cat(pool, dim=-1) if len(pool) > 1 else pool[0])
        if not self.has_cls:
            return features, features.norm(dim=-1)
        activity = self._cls_attention(hidden[self.last_used - 1])
        if self.strategy == "default":
            activity = activity[:, 1:]
        return features, activity

    def _cls_attention(self, layer_input: torch.Tensor) -> torch.Tensor:
        """Attention the CLS query pays to every token [B, T] in layer ``last_used - 1``."""
        layer = self.encoder_layers[self.last_used - 1]
        attention = layer.self_attn
        x = layer.layer_norm1(layer_input)
        batch, tokens, width = x.shape
        heads = self.num_heads
        q = attention.q_proj(x[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)
        k = attention.k_proj(x).view(batch, tokens, heads, -1).transpose(1, 2)
        scale = (width // heads) ** -0.5
        weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, T]
        return weights.mean(dim=1)[:, 0]


class LlavaExport:
    """The ``ExportHalf`` of a loaded LLaVA draft."""

    def __init__(self, model, processor):
        config = model.config
        text, vision = config.text_config, config.vision_config
        if text.model_type not in SUPPORTED_TEXT:
            raise UnsupportedModelError(f"LLaVA language model {text.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_TEXT)}.")
        if vision.model_type not in SUPPORTED_VISION:
            raise UnsupportedModelError(f"LLaVA vision tower {vision.model_type!r} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_VISION)}.")
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)
        self.vision = LlavaVision(model).eval()
        self.decoder = FlatCacheDecoder(model.model.language_model, model.lm_head, text).eval()
        self.decoder_spec = decoder_spec(text, model.get_input_embeddings().weight.shape[0])
        self.input_size = (vision.image_size, vision.image_size)

    def vision_graph(self) -> GraphTrace:
        vision = self.model.config.vision_config
        pixel_values = torch.randn(TRACE_BATCH, vision.num_channels, vision.image_size, vision.image_size)
        axes = {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}, "activity": {0: "batch"}}
        return GraphTrace(self.vision, (pixel_values,), ["pixel_values"], ["image_features", "activity"], axes,
                          ({0: Dim("batch", min=1, max=1024)},))

    def decoder_graph(self) -> GraphTrace:
        return decoder_graph(self.decoder, self.decoder_spec)

    def embed_tokens(self) -> np.ndarray:
        return self.model.get_input_embeddings().weight.detach().float().numpy().astype(np.float32)

    def processor_inputs(self, image, question: str) -> dict:
        return dict(self.processor(images=image, text=fill_prompt(self.template, question),
                                   return_tensors="pt"))

    def vision_feeds(self, inputs) -> dict[str, np.ndarray]:
        return {"pixel_values": inputs["pixel_values"].numpy().astype(np.float32)}

    def image_section(self) -> dict:
        return image_section(self.processor.image_processor, self.model.config.vision_config.image_size)

    def tokenizer_section(self, tokenizer_file: Path) -> dict:
        return tokenizer_section(self.model, self.processor, tokenizer_file, self.model.config.image_token_id)

    def source_section(self) -> dict:
        config = self.model.config
        return {"architecture": type(self.model).__name__, "text_model_type": config.text_config.model_type,
                "vision_model_type": config.vision_config.model_type}


def image_section(ip, image_size: int) -> dict:
    """The manifest's ``image`` section of the image processor ``ip`` (see ``llava.device``):
    its own resize (CLIP: shortest edge; SigLIP: a fixed height and width), its crop
    (only when it crops), rescale, normalization and resampling."""
    resample = getattr(ip, "resample", 3)
    crop = bool(getattr(ip, "do_center_crop", False))
    return {
        "size": [image_size, image_size],
        "resize": _resize(ip.size) if getattr(ip, "do_resize", True) else None,
        "crop_size": _size(getattr(ip, "crop_size", None), (image_size, image_size)) if crop else None,
        "do_center_crop": crop,
        "rescale_factor": float(getattr(ip, "rescale_factor", 1 / 255)) if getattr(ip, "do_rescale", True) else 1.0,
        "mean": [float(x) for x in ip.image_mean] if getattr(ip, "do_normalize", True) else [0.0, 0.0, 0.0],
        "std": [float(x) for x in ip.image_std] if getattr(ip, "do_normalize", True) else [1.0, 1.0, 1.0],
        "resample": RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), str(resample)),
        "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
    }


def _field(value, key):
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def _resize(size) -> dict:
    if _field(size, "height") and _field(size, "width"):
        return {"height": int(_field(size, "height")), "width": int(_field(size, "width"))}
    if _field(size, "shortest_edge") and not _field(size, "longest_edge"):
        return {"shortest_edge": int(_field(size, "shortest_edge"))}
    raise UnsupportedModelError(f"image processor size {size} is not supported: covspec's device preprocessing "
                                "knows a shortest-edge resize (CLIP) and a fixed height and width (SigLIP).")


def _size(value, default) -> list[int]:
    if value is None or _field(value, "height") is None:
        return list(default)
    return [int(_field(value, "height")), int(_field(value, "width"))]
