"""Build, save and load local LLaVA model folders; render their prompt template.

A model folder is a standard transformers folder: ``config.json`` +
``model.safetensors`` (``LlavaForConditionalGeneration``), ``tokenizer.json`` +
``tokenizer_config.json`` (with a chat template), and the processor files
(``LlavaProcessor`` = CLIP image processor + tokenizer). Everything loads offline;
``trust_remote_code`` is never set.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN]

# Single-turn template: one image, one question. `add_generation_prompt` appends
# the answer cue. Both sides render it through `prompt_template` below.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} question :"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)
QUESTION_SLOT = "{question}"

SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)


class ModelFolderError(ValueError):
    """A folder is not a loadable model of a supported architecture."""


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


def save_llava_folder(model, tokenizer: Tokenizer, path: str | Path, *, image_size: int,
                      image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                      image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> Path:
    """Save ``model`` (a LlavaForConditionalGeneration) with tokenizer and processor.

    The image processor resizes to ``image_size`` (bicubic) without cropping changes
    for square inputs, rescales to [0, 1] and normalizes with mean/std.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN})
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    vision = model.config.vision_config
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean), image_std=list(image_std), resample=3)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=hf_tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path


def read_config(path: str | Path) -> dict:
    """The folder's ``config.json``, checked to be a supported architecture."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder; pass a local model folder (config.json + weights).")
    if not config_file.is_file():
        raise ModelFolderError(f"{path} is not a model folder: it has no config.json.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{config_file} is not valid JSON ({exc}).") from exc
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelFolderError(
            f"{path}: architecture {architectures[0]!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelFolderError(f"{path} has a config.json but no weights (*.safetensors).")
    return config


def load_llava(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a local folder, in eval mode. Nothing is fetched."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    read_config(path)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).to(device).eval()
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def prompt_template(processor) -> str:
    """The rendered single-image prompt with ``{question}`` where the question goes.

    Device and edge both fill this string, so both tokenize the same text.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_SLOT}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if rendered.count(QUESTION_SLOT) != 1 or rendered.count(IMAGE_TOKEN) != 1:
        raise ModelFolderError("the chat template must place one image and one question.")
    return rendered
