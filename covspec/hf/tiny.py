"""Tiny random LLaVA folders built from configs, for tests and wire measurements.

Weights are random (seeded) so acceptance is low, but every code path is the real
one: real transformers model, real tokenizer, real processor, saved and reloaded.
Two towers: CLIP (the default: shortest-edge resize + center crop, a CLS token,
"default" feature selection) and SigLIP (``tower="siglip"``: a fixed square resize
without a crop, no CLS token, "full" selection, as llava-interleave-qwen does),
with a Llama or Qwen2 language model.
"""

from __future__ import annotations

from pathlib import Path

from covspec.hf.folder import SPECIAL_TOKENS, build_word_tokenizer, save_llava_folder

BASE_WORDS = ["what", "color", "is", "the", "a", "?", ".", ":", ",", "question", "answer",
              "red", "green", "blue", "circle", "square", "how", "many", "shapes", "there", "are"]
TOWERS = ("clip", "siglip")
LANGUAGES = ("llama", "qwen2", "mistral")


def tiny_text_config(vocab_size: int, *, language: str = "llama", hidden: int = 32, layers: int = 2,
                     sliding_window: int | None = None):
    """A tiny Llama, Qwen2 or Mistral config (4 heads, 2 KV heads) with the word tokenizer's
    special ids. ``sliding_window``: Mistral's window (every layer), or Qwen2's
    ``use_sliding_window`` on every layer but the first."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[language]
    window = {}
    if language == "mistral":
        window = {"sliding_window": sliding_window}
    elif sliding_window is not None and language == "qwen2":
        window = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 1}
    return config_class(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **window)


def tiny_vision_config(*, tower: str = "clip", image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                       layers: int = 2):
    """A tiny CLIP or SigLIP vision tower config (2 heads)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, not {tower!r}")
    if tower == "siglip":
        return SiglipVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                  num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden)


def tiny_llava_config(vocab_size: int, *, image_size: int = 32, patch_size: int = 8,
                      text_hidden: int = 32, text_layers: int = 2, vision_hidden: int = 32,
                      vision_layers: int = 2, tower: str = "clip", language: str = "llama",
                      sliding_window: int | None = None):
    """A LlavaConfig with a CLIP (CLS dropped) or SigLIP ("full") tower and a Llama, Qwen2 or
    Mistral LM (``sliding_window``: see ``tiny_text_config``)."""
    from transformers import LlavaConfig

    vision = tiny_vision_config(tower=tower, image_size=image_size, patch_size=patch_size, hidden=vision_hidden,
                                layers=vision_layers)
    text = tiny_text_config(vocab_size, language=language, hidden=text_hidden, layers=text_layers,
                            sliding_window=sliding_window)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full" if tower == "siglip" else "default",
        projector_hidden_act="gelu", image_seq_length=(image_size // patch_size) ** 2)


def tiny_words(vocab_size: int) -> list[str]:
    """``BASE_WORDS`` and fillers ``w0, w1, ...`` up to ``vocab_size`` tokens with the special ones."""
    filler = max(0, vocab_size - len(SPECIAL_TOKENS) - len(BASE_WORDS))
    return BASE_WORDS + [f"w{i}" for i in range(filler)]


def save_tiny_llava(path: str | Path, *, vocab_size: int = 64, seed: int = 0, **config_kwargs) -> Path:
    """Build a seeded random tiny LLaVA with a ``vocab_size`` word tokenizer and save it."""
    import torch
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_word_tokenizer(tiny_words(vocab_size))
    config = tiny_llava_config(tokenizer.get_vocab_size(), **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return save_llava_folder(model, tokenizer, path, image_size=config.vision_config.image_size,
                             siglip=config_kwargs.get("tower") == "siglip")
