"""Tiny random Idefics3 (SmolVLM-style) folders built from configs, for tests (and, with a
real model's dimensions, for the device bench: ``covspec.bench.device.size``).

A folder is a standard transformers folder: ``config.json`` + ``model.safetensors``
(``Idefics3ForConditionalGeneration``: a small SigLIP-like vision tower, the
pixel-shuffle connector, a small Llama), ``tokenizer.json`` + ``tokenizer_config.json``
with a SmolVLM-style chat template, and the ``Idefics3Processor`` files (image
splitting into tiles plus a global image, row/column tokens in the prompt).

The word tokenizer carries every token the processor needs (``<image>``,
``<fake_token_around_image>``, ``<global-img>``, ``<end_of_utterance>``,
``<row_i_col_j>`` for i, j in 1..6) and a plain ``"\\n"`` token, so the expanded
prompt's row breaks are real tokens as with SmolLM2's tokenizer. Weights are random
(seeded); every code path is the real one. Torch and transformers, imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

from covspec.hf.folder import BOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_word_tokenizer
from covspec.hf.tiny import BASE_WORDS

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
NEWLINE = "\n"
WORDS = ["User", "Assistant"] + BASE_WORDS

# SmolVLM-Instruct's template, spaced for a word tokenizer: "User:<image> {question}<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %} {{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3_tokenizer(vocab_size: int):
    """The word tokenizer (LLaVA's special tokens and words, filler words up to about
    ``vocab_size``) plus the Idefics3 special tokens and the ``"\\n"`` token."""
    from tokenizers import AddedToken

    extra = [FAKE_TOKEN, GLOBAL_TOKEN, END_OF_UTTERANCE, *ROW_COL_TOKENS]
    filler = max(0, vocab_size - 5 - len(WORDS) - len(extra) - 1)
    tokenizer = build_word_tokenizer(WORDS + [f"w{i}" for i in range(filler)])
    tokenizer.add_special_tokens(extra)
    tokenizer.add_tokens([AddedToken(NEWLINE, normalized=False, special=False)])
    return tokenizer


def tiny_idefics3_config(vocab_size: int, token_ids: dict[str, int], *, tile: int = 32, patch_size: int = 8,
                         scale_factor: int = 2, text_hidden: int = 32, text_layers: int = 2,
                         vision_hidden: int = 32, vision_layers: int = 2, smolvlm: bool = False,
                         vision: dict | None = None, text: dict | None = None):
    """An Idefics3Config (a SmolVLMConfig with ``smolvlm``): a SigLIP-like tower on
    ``tile`` x ``tile`` tiles and a Llama.

    ``vision`` (Idefics3/SmolVLM vision config fields, as SiglipVisionConfig's) and
    ``text`` (LlamaConfig fields) override the tiny defaults, e.g. with a real model's
    dimensions. The vocabulary size and the special token ids are the tokenizer's; the
    tower's ``image_size`` must be the tile size; the VLM ties its LM head as the
    language model does."""
    from transformers import Idefics3Config, LlamaConfig, SmolVLMConfig, SmolVLMVisionConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision_class, config_class = (SmolVLMVisionConfig, SmolVLMConfig) if smolvlm else \
        (Idefics3VisionConfig, Idefics3Config)
    vision_fields = {"hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
                     "num_hidden_layers": vision_layers, "num_attention_heads": 2, "image_size": tile,
                     "patch_size": patch_size, **(vision or {})}
    if vision_fields["image_size"] != tile:
        raise ValueError(f"the vision tower takes {vision_fields['image_size']} px images but the tiles are {tile} "
                         "px; they must be equal.")
    text_fields = {"hidden_size": text_hidden, "intermediate_size": text_hidden * 2, "num_hidden_layers": text_layers,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                   "tie_word_embeddings": False, **(text or {}),
                   "vocab_size": vocab_size, "bos_token_id": token_ids[BOS_TOKEN],
                   "eos_token_id": token_ids[END_OF_UTTERANCE], "pad_token_id": token_ids[PAD_TOKEN]}
    return config_class(vision_config=vision_class(**vision_fields), text_config=LlamaConfig(**text_fields),
                        image_token_id=token_ids[IMAGE_TOKEN], scale_factor=scale_factor,
                        tie_word_embeddings=text_fields["tie_word_embeddings"])


def save_tiny_idefics3(path: str | Path, *, vocab_size: int = 96, seed: int = 0, longest_edge: int = 96,
                       tile: int = 32, smolvlm: bool = False, **config_kwargs) -> Path:
    """Build a seeded random tiny Idefics3 and save it with its tokenizer and processor.

    Images are resized so the longest edge is ``longest_edge``, then split into tiles of
    ``tile`` pixels (up to (longest_edge / tile)^2 tiles) plus a global image.
    ``config_kwargs`` go to ``tiny_idefics3_config`` (``vision`` and ``text`` give real
    dimensions; ``vocab_size`` sizes the word tokenizer, and so the vocabulary). With
    ``smolvlm`` the model is a ``SmolVLMForConditionalGeneration`` (same layout) and the
    processor files name ``SmolVLMProcessor`` / ``SmolVLMImageProcessor`` as a SmolVLM
    checkpoint's do (``SmolVLMProcessor`` itself cannot be built here: it needs
    ``num2words``).
    """
    import torch
    from transformers import (Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                              PreTrainedTokenizerFast, SmolVLMForConditionalGeneration)

    path = Path(path)
    tokenizer = build_idefics3_tokenizer(vocab_size)
    ids = tokenizer.get_vocab(with_added_tokens=True)
    config = tiny_idefics3_config(tokenizer.get_vocab_size(), ids, tile=tile, smolvlm=smolvlm, **config_kwargs)
    torch.manual_seed(seed)
    model_class = SmolVLMForConditionalGeneration if smolvlm else Idefics3ForConditionalGeneration
    model = model_class(config).eval()
    model.generation_config.pad_token_id = ids[PAD_TOKEN]
    model.generation_config.eos_token_id = ids[END_OF_UTTERANCE]
    model.generation_config.bos_token_id = ids[BOS_TOKEN]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=END_OF_UTTERANCE, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN})
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=1)
    vision = config.vision_config
    image_seq_len = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                  image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    if smolvlm:   # as a SmolVLM checkpoint names its processor classes
        config_file = path / "processor_config.json"
        saved = json.loads(config_file.read_text())
        saved["processor_class"] = "SmolVLMProcessor"
        saved["image_processor"]["image_processor_type"] = "SmolVLMImageProcessor"
        config_file.write_text(json.dumps(saved, indent=2) + "\n")
    return path
