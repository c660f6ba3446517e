"""Tiny random LLaVA folders built from configs, for tests and wire measurements.

Weights are random (seeded) so acceptance is low, but every code path is the real
one: real transformers model, real tokenizer, real processor, saved and reloaded.
"""

from __future__ import annotations

from pathlib import Path

from covspec.hf.folder import SPECIAL_TOKENS, build_word_tokenizer, save_llava_folder

BASE_WORDS = ["what", "color", "is", "the", "a", "?", ".", ":", ",", "question", "answer",
              "red", "green", "blue", "circle", "square", "how", "many", "shapes", "there", "are"]


def tiny_llava_config(vocab_size: int, *, image_size: int = 32, patch_size: int = 8,
                      text_hidden: int = 32, text_layers: int = 2, vision_hidden: int = 32,
                      vision_layers: int = 2):
    """A LlavaConfig with a CLIP vision tower and a Llama language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=(image_size // patch_size) ** 2)


def save_tiny_llava(path: str | Path, *, vocab_size: int = 64, seed: int = 0, **config_kwargs) -> Path:
    """Build a seeded random tiny LLaVA with a ``vocab_size`` word tokenizer and save it."""
    import torch
    from transformers import LlavaForConditionalGeneration

    filler = max(0, vocab_size - len(SPECIAL_TOKENS) - len(BASE_WORDS))
    words = BASE_WORDS + [f"w{i}" for i in range(filler)]
    tokenizer = build_word_tokenizer(words)
    config = tiny_llava_config(tokenizer.get_vocab_size(), **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return save_llava_folder(model, tokenizer, path, image_size=config.vision_config.image_size)
