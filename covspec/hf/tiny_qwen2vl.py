"""Tiny random Qwen2-VL / Qwen2.5-VL folders built from configs, for tests and benchmarks.

A folder is what a Qwen2-VL folder holds for one image: ``config.json`` + weights
(``Qwen2VLForConditionalGeneration``, or ``Qwen2_5_VLForConditionalGeneration`` with
``version="2.5"``: a window-attention tower with full-attention blocks), ``tokenizer.json``
+ ``tokenizer_config.json``, ``preprocessor_config.json`` (``Qwen2VLImageProcessor``:
patch 8, merge 2, so images are resized to multiples of 16 px between ``min_pixels``
and ``max_pixels``) and ``chat_template.jinja``. The tower's patches are 8 px (not 14)
so that test images stay small; everything else is the real architecture: 3-D
M-RoPE (``mrope_section`` sized to the head), the 2x2 patch merger, a temporal patch
of 2 (a still image repeated).

The word tokenizer holds LLaVA's special tokens and words plus Qwen's
``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>`` and ``<|video_pad|>``.
``vocab_rows`` pads the language model's vocabulary beyond the tokenizer (released
Qwen2-VL checkpoints have 151,936 or 152,064 rows for one tokenizer); padding rows of
the LM head are zero. Torch and transformers, imported lazily.
"""

from __future__ import annotations

from pathlib import Path

from covspec.hf.folder import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_word_tokenizer
from covspec.hf.tiny import tiny_words

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
PATCH, MERGE = 8, 2
MIN_PIXELS, MAX_PIXELS = 32 * 32, 96 * 96
VERSIONS = ("2", "2.5")

# Qwen's single-image prompt, spaced for a word tokenizer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} question :"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|>"
    "{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)


def build_qwen2vl_tokenizer(vocab_size: int):
    """The word tokenizer with Qwen's vision tokens (about ``vocab_size`` tokens in all)."""
    extra = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
    tokenizer = build_word_tokenizer(tiny_words(vocab_size - len(extra)))
    tokenizer.add_special_tokens(extra)
    return tokenizer


def tiny_qwen2vl_config(vocab_rows: int, ids: dict, *, version: str = "2", text_hidden: int = 32,
                        text_layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2):
    """A tiny ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` (4 heads, 2 KV heads in the LM)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    head_dim = text_hidden // 4
    quarter = head_dim // 8
    section = [head_dim // 2 - 2 * quarter, quarter, quarter]               # temporal, height, width
    text = {"vocab_size": vocab_rows, "hidden_size": text_hidden, "intermediate_size": text_hidden * 2,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}}
    vision = {"depth": vision_layers, "num_heads": 2, "in_channels": 3, "patch_size": PATCH,
              "spatial_merge_size": MERGE, "temporal_patch_size": 2}
    if version == "2":
        vision.update(embed_dim=vision_hidden, hidden_size=text_hidden, mlp_ratio=2)
        config_class = Qwen2VLConfig
    else:
        # Windows of 32 px (2x2 merged tokens); the last block attends fully.
        vision.update(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, out_hidden_size=text_hidden,
                      window_size=32, fullatt_block_indexes=[vision_layers - 1])
        config_class = Qwen2_5_VLConfig
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def save_tiny_qwen2vl(path: str | Path, *, vocab_size: int = 64, vocab_rows: int | None = None, seed: int = 0,
                      version: str = "2", text_hidden: int = 32, text_layers: int = 2, vision_hidden: int = 32,
                      vision_layers: int = 2, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Path:
    """Build a seeded random tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL and save it as a folder."""
    import torch
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)

    tokenizer = build_qwen2vl_tokenizer(vocab_size)
    size = tokenizer.get_vocab_size()
    rows = vocab_rows or size
    if rows < size:
        raise ValueError(f"vocab_rows ({rows}) must hold the tokenizer's {size} tokens.")
    ids = {"image_token_id": tokenizer.token_to_id(IMAGE_PAD), "video_token_id": tokenizer.token_to_id(VIDEO_PAD),
           "vision_start_token_id": tokenizer.token_to_id(VISION_START),
           "vision_end_token_id": tokenizer.token_to_id(VISION_END)}
    config = tiny_qwen2vl_config(rows, ids, version=version, text_hidden=text_hidden, text_layers=text_layers,
                                 vision_hidden=vision_hidden, vision_layers=vision_layers)
    torch.manual_seed(seed)
    model_class = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    model = model_class(config).eval()
    with torch.no_grad():
        model.lm_head.weight[size:] = 0.0
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                           pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                           extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD})
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=PATCH,
                             merge_size=MERGE, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             resample=3).save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path
