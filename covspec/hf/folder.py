"""Build and save local LLaVA model folders (tiny test models, the toy world).

A model folder is a standard transformers folder: ``config.json`` +
``model.safetensors`` (``LlavaForConditionalGeneration``), ``tokenizer.json`` +
``tokenizer_config.json`` (with a chat template), and the processor files
(``LlavaProcessor`` = CLIP image processor + tokenizer). Loading a folder is the
family's job (``covspec.families``).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN]

# Single-turn template: one image, one question. `add_generation_prompt` appends
# the answer cue. Both sides render it through the LLaVA family's `prompt_template`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} question :"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)


def build_word_tokenizer(words: list[str]) -> Tokenizer:
    """A word-level tokenizer: special tokens first (ids 0..4), then ``words`` in order."""
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + list(words):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def hf_word_tokenizer(tokenizer: Tokenizer):
    """``tokenizer`` as a transformers fast tokenizer with the special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN})
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def save_llava_folder(model, tokenizer: Tokenizer, path: str | Path, *, image_size: int,
                      image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                      image_std: tuple[float, float, float] = (0.5, 0.5, 0.5), siglip: bool = False) -> Path:
    """Save ``model`` (a LlavaForConditionalGeneration) with tokenizer and processor.

    The image processor rescales to [0, 1] and normalizes with mean/std after resizing
    (bicubic) as the tower's own processor does: CLIP (default) resizes the shortest
    edge to ``image_size`` and center crops a square; SigLIP (``siglip=True``) resizes
    to ``image_size`` x ``image_size`` without a crop, and the tower has no CLS token.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor, SiglipImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tokenizer = hf_word_tokenizer(tokenizer)
    vision = model.config.vision_config
    if siglip:
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                                  image_mean=list(image_mean), image_std=list(image_std), resample=3)
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=list(image_mean), image_std=list(image_std), resample=3)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=hf_tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=0 if siglip else 1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path
