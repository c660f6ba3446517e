"""Small pieces every family shares, so no family writes them again.

- ``prompt_template(processor)``: the model's chat template rendered for one image and
  one question, with ``{question}`` where the question goes;
- ``fill_prompt(template, question)``: the one way to put a question into that template,
  used by every family's device, edge and export halves, so draft and target tokenize
  the same text: the question stripped of surrounding whitespace replaces the (last)
  ``{question}``; any other brace in the template or the question is plain text;
- ``saved_chat_template(path)``: the processor's chat template saved in a model folder;
- ``generation_eos_ids(model, tokenizer)``: EOS ids as ``generate`` uses them;
- ``require_image_keys(image, keys)``: a manifest ``image`` section checked for the
  keys a device half needs;
- ``target_context(...)``: the edge's context of one question and image through the
  model's processor, with the opt-in kept visual tokens checked;
- ``kept_embeddings(model, ids, features, keep)``: the pruned target's input embeddings
  (text rows and the kept visual tokens' rows, in prompt order);
- ``LazyFamily``: a ``Family`` whose halves are named ``"module:attribute"`` and imported
  only when asked for (each family package is one ``LazyFamily``, so importing it
  imports no torch);
- ``ProcessorTarget``: the ``TargetHalf`` pieces every family's edge half shares (the
  template, ``context``, the shortest reusable prefix, EOS ids, vocabulary); a family
  subclasses it and adds its ``pruned_inputs`` (and the hooks it needs).

Imports no torch at import time: the functions take loaded objects and plain mappings.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from covspec.families.chat import QUESTION_SLOT, chat_turns
from covspec.families.interface import (DeviceHalf, ExportHalf, Family, ImageSizeError, ModelFolderError,
                                        TargetContext, TargetHalf)
from covspec.protocol.errors import BAD_FIELD, EdgeError
from covspec.protocol.manifest import ArtifactError


def prompt_template(processor) -> str:
    """The rendered single-image prompt with ``{question}`` where the question goes (the
    image placeholder unexpanded); ``ModelFolderError`` if the template cannot place them."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_SLOT}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if rendered.count(QUESTION_SLOT) != 1 or rendered.count(processor.image_token) != 1:
        raise ModelFolderError("the chat template must place one image and one question.")
    return rendered


def fill_prompt(template: str, question: str) -> str:
    """``template`` with its ``{question}`` replaced by ``question`` stripped of surrounding
    whitespace. Not ``str.format``: a brace elsewhere in the template (a chat template's
    literal ``{``) or in the question stays as it is. The slot is the template's last
    ``{question}``: a conversation's template (``families/chat.py``) holds earlier texts,
    which may read ``{question}`` themselves."""
    before, slot, after = template.rpartition(QUESTION_SLOT)
    return before + question.strip() + after if slot else template


def saved_chat_template(path: Path) -> str | None:
    """The processor's chat template saved in the folder (``chat_template.jinja`` or
    ``chat_template.json``), if any."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    return None


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


def kept_embeddings(model, ids, features, keep):
    """The pruned target's inputs from the prompt's ids [L]: (embeddings [L', D] of the text
    rows and of the kept visual tokens, ``features`` [N, D] in the image's slots, in prompt
    order; the mask [L] of the rows kept). ``keep``: LongTensor [K] into the N visual tokens."""
    import torch

    is_image = ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(ids[None])[0].clone()                         # [L, D]
    embeds[is_image] = features.to(embeds.dtype)
    rows = ~is_image
    rows[torch.nonzero(is_image)[:, 0][keep]] = True
    return embeds[rows], rows


class ProcessorTarget(TargetHalf):
    """The edge half of a family whose processor takes ``images`` and ``text``: the template
    rendered once, ``context`` through ``fill_prompt`` and ``target_context``, the prefix a
    cached one must cover (through the last image token), EOS ids and the vocabulary. A family
    subclasses it with its ``pruned_inputs`` (and ``placeholders``, the
    texts a question may not carry; ``processor_options``, extra processor arguments)."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.template = prompt_template(processor)
        self.turns = chat_turns(processor)

    def placeholders(self) -> Iterable[str]:
        return [self.processor.image_token]

    def processor_options(self) -> dict[str, Any]:
        return {}

    def context(self, question: str, image, keep: Sequence[int] | None = None,
                template: str | None = None) -> TargetContext:
        return target_context(self.model, self.processor, fill_prompt(template or self.template, question), question,
                              image, keep, self.placeholders(), **self.processor_options())

    def shortest_reused_prefix(self, context: TargetContext) -> int | None:
        """Everything up to the last image token: before it a token's KV depends on the image
        (and, with bidirectional image attention as Gemma 3's, on later image tokens); after it
        every token is text attending causally, as a cached extension runs it. None for a
        context without an image token."""
        slots = (context.inputs["input_ids"][0] == self.model.config.image_token_id).nonzero()
        return int(slots[-1, 0]) + 1 if len(slots) else None

    def eos_ids(self) -> set[int]:
        return generation_eos_ids(self.model, self.processor.tokenizer)

    def vocab(self) -> Mapping[str, int]:
        return self.processor.tokenizer.get_vocab()


def _named(spec: str):
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


class LazyFamily(Family):
    """A ``Family`` from the names (``"package.module:attribute"``) of its device half class,
    its loader, its edge half class and its export half class, each imported when first asked
    for. ``exporter``'s ``image_size`` reaches the export half of a ``dynamic_resolution``
    family only."""

    def __init__(self, name: str, architectures: tuple[str, ...], *, device_half: str, loader: str,
                 target_half: str, export_half: str, dynamic_resolution: bool = False):
        self.name = name
        self.architectures = architectures
        self.dynamic_resolution = dynamic_resolution
        self.halves = {"device": device_half, "load": loader, "target": target_half, "export": export_half}

    def device(self, *, image, tokenizer_section, prompt_template, tokenizer, embed_tokens) -> DeviceHalf:
        return _named(self.halves["device"])(image=image, tokenizer_section=tokenizer_section,
                                             prompt_template=prompt_template, tokenizer=tokenizer,
                                             embed_tokens=embed_tokens)

    def load(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
        return _named(self.halves["load"])(path, device=device, dtype=dtype)

    def target(self, model, processor) -> TargetHalf:
        return _named(self.halves["target"])(model, processor)

    def exporter(self, model, processor, image_size: tuple[int, int] | None = None) -> ExportHalf:
        if not self.dynamic_resolution:
            if image_size is not None:
                raise ImageSizeError(f"{self.name} models have a fixed vision input size; an image size applies "
                                     "to dynamic-resolution families only.")
            return _named(self.halves["export"])(model, processor)
        return _named(self.halves["export"])(model, processor, image_size)

    def __repr__(self) -> str:
        return f"LazyFamily({self.name!r})"
