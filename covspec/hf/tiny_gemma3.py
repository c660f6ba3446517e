"""Tiny random Gemma 3 folders built from configs, for tests.

A folder is a standard transformers folder: ``config.json`` + ``model.safetensors``
(``Gemma3ForConditionalGeneration``: a small SigLIP tower on ``image_size`` pixels,
the avg-pool projector down to ``mm_tokens_per_image`` tokens, a small Gemma 3
language model whose layers interleave sliding-window and global attention),
``tokenizer.json`` + ``tokenizer_config.json`` with Gemma 3's chat template, and the
``Gemma3Processor`` files (``Gemma3ImageProcessor``: a fixed square resize).

The word tokenizer has Gemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
``<unk>`` 3, ``<start_of_turn>``, ``<end_of_turn>``, ``<start_of_image>``,
``<end_of_image>``, ``<image_soft_token>``), ``"\\n"`` and ``"\\n\\n"`` as real tokens,
and adds ``<bos>`` itself as Gemma's tokenizer does (so the chat template's
``{{ bos_token }}`` exercises the processor's BOS rule). The sliding window is small
(``sliding_window``, 24 by default) so that tests run past it. Weights are random
(seeded); the projector's weight, which transformers initializes to zeros, is drawn
at random so that images matter. Torch and transformers, imported lazily.
"""

from __future__ import annotations

from pathlib import Path

from covspec.hf.tiny import BASE_WORDS

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_TOKEN]
NEWLINES = ["\n", "\n\n"]
WORDS = ["user", "model"] + BASE_WORDS

# Gemma 3's chat template (google/gemma-3-4b-it), without the system-message branch.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_gemma3_tokenizer(vocab_size: int):
    """A word tokenizer with Gemma's special tokens first, the newline tokens, ``WORDS`` and
    fillers up to about ``vocab_size``; it prepends ``<bos>`` as Gemma's tokenizer does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    filler = max(0, vocab_size - len(SPECIAL) - len(NEWLINES) - len(WORDS))
    vocab: dict[str, int] = {}
    for token in SPECIAL + WORDS + [f"w{i}" for i in range(filler)]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.add_tokens([AddedToken(text, normalized=False, special=False) for text in NEWLINES])
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, bos)])
    return tokenizer


def tiny_gemma3_config(token_ids: dict[str, int], vocab_size: int, *, image_size: int = 32, patch_size: int = 4,
                       tokens_per_image: int = 16, text_hidden: int = 32, text_layers: int = 2,
                       vision_hidden: int = 32, vision_layers: int = 2, sliding_window: int = 24,
                       sliding_pattern: int = 2):
    """A Gemma3Config: a SigLIP tower and a Gemma 3 LM in which every ``sliding_pattern``-th
    layer is global and the others slide over ``sliding_window`` tokens."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch_size, vision_use_head=False)
    layer_types = ["full_attention" if (i + 1) % sliding_pattern == 0 else "sliding_attention"
                   for i in range(text_layers)]
    text = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_hidden * 2,
                            num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            query_pre_attn_scalar=8, sliding_window=sliding_window, layer_types=layer_types,
                            max_position_embeddings=1024, bos_token_id=token_ids[BOS],
                            eos_token_id=[token_ids[EOS], token_ids[END_OF_TURN]], pad_token_id=token_ids[PAD])
    return Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image,
                        boi_token_index=token_ids[BOI], eoi_token_index=token_ids[EOI],
                        image_token_index=token_ids[IMAGE_TOKEN])


def save_tiny_gemma3(path: str | Path, *, vocab_size: int = 96, seed: int = 0, **config_kwargs) -> Path:
    """Build a seeded random tiny Gemma 3 and save it with its tokenizer and processor."""
    import torch
    from transformers import (Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              PreTrainedTokenizerFast)

    path = Path(path)
    tokenizer = build_gemma3_tokenizer(vocab_size)
    ids = tokenizer.get_vocab(with_added_tokens=True)
    config = tiny_gemma3_config(ids, tokenizer.get_vocab_size(), **config_kwargs)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():   # transformers starts the projector at zero: images would not matter
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0.0, config.vision_config.hidden_size ** -0.5)
    model.generation_config.pad_token_id = ids[PAD]
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.eos_token_id = [ids[EOS], ids[END_OF_TURN]]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_TOKEN})
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    size = config.vision_config.image_size
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5],
                                              image_std=[0.5, 0.5, 0.5], resample=2, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                image_seq_length=config.mm_tokens_per_image, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path
