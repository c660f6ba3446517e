"""Small pieces every family shares, so no family writes them again.

- ``prompt_template(processor)``: the model's chat template rendered for one image and
  one question, with ``{question}`` where the question goes (device and edge both fill
  this string, so both tokenize the same text);
- ``generation_eos_ids(model, tokenizer)``: EOS ids as ``generate`` uses them;
- ``require_image_keys(image, keys)``: a manifest ``image`` section checked for the
  keys a device half needs.

Imports no torch: the functions take loaded objects and plain mappings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from covspec.families.interface import ModelFolderError
from covspec.protocol.manifest import ArtifactError

QUESTION_SLOT = "{question}"


def prompt_template(processor) -> str:
    """The rendered single-image prompt with ``{question}`` where the question goes (the
    image placeholder unexpanded); ``ModelFolderError`` if the template cannot place them."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_SLOT}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if rendered.count(QUESTION_SLOT) != 1 or rendered.count(processor.image_token) != 1:
        raise ModelFolderError("the chat template must place one image and one question.")
    return rendered


def generation_eos_ids(model, tokenizer) -> set[int]:
    """EOS ids as ``generate`` uses them: the generation config first, then the text
    config, then the tokenizer."""
    for source in (model.generation_config.eos_token_id, model.config.text_config.eos_token_id,
                   tokenizer.eos_token_id):
        if source is not None:
            return {int(source)} if isinstance(source, int) else {int(i) for i in source}
    return set()


def require_image_keys(image: Mapping, keys: Iterable[str]) -> None:
    """``ArtifactError`` naming the first of ``keys`` the manifest's image section lacks."""
    for key in keys:
        if key not in image:
            raise ArtifactError(f"manifest.json: missing field 'image.{key}'.")
