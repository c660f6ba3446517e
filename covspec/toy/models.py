"""The toy target and draft: LLaVA configs, the shared tokenizer, and their folders.

Both models share one word tokenizer over the ShapesVQA vocabulary and the prompt
template of ``covspec.hf.folder``. The CLIP tower keeps its CLS token (dropped from
the visual tokens by ``vision_feature_select_strategy="default"``) because token
pruning reads CLS attention as its activity signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from covspec.hf.folder import SPECIAL_TOKENS, build_word_tokenizer, save_llava_folder
from covspec.toy import shapes

PATCH_SIZE = 8
VISUAL_TOKENS = (shapes.IMAGE_SIZE // PATCH_SIZE) ** 2
ROLES = ("target", "draft")
# Language-model init scale. At the usual 0.02 the toy LM sat for thousands of steps on
# the answer prior without learning to look a shape up by content (even from oracle
# visual tokens); at 0.1 it learns "what color is the circle" from 9 oracle tokens in
# ~600 steps.
TEXT_INIT = 0.1


@dataclass(frozen=True)
class ModelSize:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int


SIZES = {
    "target": ModelSize(96, 3, 4, 192, 4, 6, 3),
    "draft": ModelSize(64, 2, 2, 128, 2, 4, 2),
}


def toy_tokenizer():
    """The word tokenizer shared by draft and target (special tokens first)."""
    return build_word_tokenizer(shapes.vocabulary())


def toy_config(size: ModelSize, vocab_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_hidden * 4,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=shapes.IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=size.vision_hidden)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.text_hidden, intermediate_size=size.text_hidden * 3,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=TEXT_INIT)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=VISUAL_TOKENS, initializer_range=TEXT_INIT)


def new_model(role: str, seed: int = 0):
    """A freshly initialized (seeded) LlavaForConditionalGeneration for ``role``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    if role not in SIZES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(SIZES)}")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(toy_config(SIZES[role], toy_tokenizer().get_vocab_size()))
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    return model


def save_toy_model(model, path: str | Path) -> Path:
    return save_llava_folder(model, toy_tokenizer(), path, image_size=shapes.IMAGE_SIZE)


def bundled_model_dir(role: str) -> Path:
    """The folder of a committed toy model inside the package."""
    return Path(str(resources.files("covspec.toy") / "models" / role))
