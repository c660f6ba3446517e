"""Tiny random LLaVA-OneVision folders built from configs, for tests and benchmarks.

A SigLIP tower ("full" selection, no CLS) on 32x32 tiles of 8x8 patches (16 tokens
per tile), a Qwen2 language model, grid pinpoints up to 3 tiles a side, and a
word tokenizer. ``vocab_rows`` pads the language model's vocabulary beyond the
tokenizer (as released OneVision checkpoints do: 151,936 or 152,064 rows for the
same tokenizer); padding rows of the LM head are zero, so like trained padding
rows they are almost never the most likely token. ``max_tiles`` sets
``vision_aspect_ratio`` ("anyres_max_M"): below the grid's size it makes the model
shrink the packed grid bilinearly. The folder is what a OneVision folder holds for
one image: ``config.json`` + weights, ``tokenizer.json`` + ``tokenizer_config.json``,
``preprocessor_config.json`` and ``chat_template.jinja``.
"""

from __future__ import annotations

from pathlib import Path

from covspec.hf.folder import CHAT_TEMPLATE, SPECIAL_TOKENS, build_word_tokenizer, hf_word_tokenizer
from covspec.hf.tiny import tiny_text_config, tiny_vision_config, tiny_words

TILE = 32
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64], [96, 96]]
VIDEO_TOKEN = "<video>"


def save_tiny_onevision(path: str | Path, *, vocab_size: int = 64, vocab_rows: int | None = None, seed: int = 0,
                        text_hidden: int = 32, text_layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                        max_tiles: int = 9) -> Path:
    """Build a seeded random tiny LLaVA-OneVision and save it as a model folder."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers import LlavaOnevisionImageProcessorPil

    words = tiny_words(vocab_size - 1) + [VIDEO_TOKEN]
    tokenizer = build_word_tokenizer(words)
    size = tokenizer.get_vocab_size()
    rows = vocab_rows or size
    if rows < size:
        raise ValueError(f"vocab_rows ({rows}) must hold the tokenizer's {size} tokens.")
    config = LlavaOnevisionConfig(
        vision_config=tiny_vision_config(tower="siglip", image_size=TILE, patch_size=8, hidden=vision_hidden,
                                         layers=vision_layers),
        text_config=tiny_text_config(rows, language="qwen2", hidden=text_hidden, layers=text_layers),
        image_token_index=SPECIAL_TOKENS.index("<image>"), video_token_index=tokenizer.token_to_id(VIDEO_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=f"anyres_max_{max_tiles}")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[size:] = 0.0
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_word_tokenizer(tokenizer).save_pretrained(path)
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3).save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path
