"""Small pieces every family shares, so no family writes them again.

- ``prompt_template(processor)``: the model's chat template rendered for one image and
  one question, with ``{question}`` where the question goes (device and edge both fill
  this string, so both tokenize the same text);
- ``generation_eos_ids(model, tokenizer)``: EOS ids as ``generate`` uses them;
- ``require_image_keys(image, keys)``: a manifest ``image`` section checked for the
  keys a device half needs;
- ``target_context(...)``: the edge's context of one question and image through the
  model's processor, with the opt-in kept visual tokens checked.

Imports no torch at import time: the functions take loaded objects and plain mappings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from covspec.families.interface import ModelFolderError, TargetContext
from covspec.protocol.errors import BAD_FIELD, EdgeError
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


def target_context(model, processor, prompt: str, question: str, image, keep: Sequence[int] | None,
                   placeholders: Iterable[str], **processor_options) -> TargetContext:
    """``processor(images=image, text=prompt)`` (``prompt``: the template filled with
    ``question``) on the model's device, pixels in its dtype. ``EdgeError(BAD_FIELD)`` for a
    question carrying one of ``placeholders``, inputs the processor refuses, or ``keep``
    (the opt-in pruned target: indices of the visual tokens it keeps) out of range."""
    for token in placeholders:
        if token in question:
            raise EdgeError(BAD_FIELD, f"the prompt contains {token!r}; send the question text only, the edge "
                                       "places the image itself.")
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt", **processor_options)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise EdgeError(BAD_FIELD, f"the prompt and image could not be processed ({exc}).") from None
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    length = int(inputs["input_ids"].shape[1])
    if keep is None:
        return TargetContext(inputs=inputs, length=length)
    import torch

    visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    keep = sorted({int(i) for i in keep})
    if not keep or keep[0] < 0 or keep[-1] >= visual:
        raise EdgeError(BAD_FIELD, f"target_keep indexes visual tokens 0..{visual - 1}; got {keep[:1]}..{keep[-1:]} "
                                   "(the target's visual tokens must match the draft's).")
    return TargetContext(inputs=inputs, length=length - visual + len(keep),
                         keep=torch.tensor(keep, dtype=torch.long, device=model.device))
