"""Model families: one object per family owns everything architecture-specific.

The contract is ``covspec.families.interface`` (re-exported here). This module is
the registry: ``family_for_folder`` reads a model folder's ``config.json``,
``family_for_model`` names the family of a loaded model, ``family_named`` the
family an artifact's manifest records. Nothing outside a family module branches on
an architecture; adding a family is one module, one ``register`` call below and
its tests.

Importing this package imports no torch: each family imports its torch halves
lazily (the device half never does).
"""

from __future__ import annotations

import json
from pathlib import Path

from covspec.families.interface import (POSITIONS, DecoderSpec, DeviceHalf, DraftContext, ExportHalf, Family,
                                        GraphTrace, ImageSizeError, ModelFolderError, PromptLayout, TargetContext,
                                        TargetHalf, UnsupportedModelError, past_names, present_names)
from covspec.families.gemma3 import GEMMA3
from covspec.families.idefics3 import IDEFICS3
from covspec.families.llava import LLAVA
from covspec.families.onevision import ONEVISION
from covspec.families.qwen2vl import QWEN2VL

__all__ = ["FAMILIES", "POSITIONS", "DecoderSpec", "DeviceHalf", "DraftContext", "ExportHalf", "Family",
           "GraphTrace", "ImageSizeError", "ModelFolderError", "PromptLayout", "TargetContext", "TargetHalf",
           "UnsupportedModelError", "family_for_architecture", "family_for_folder", "family_for_model",
           "family_named", "past_names", "present_names", "register", "supported_architectures"]

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry; its name and architectures must be new."""
    taken = set(supported_architectures()) & set(family.architectures)
    if family.name in FAMILIES or taken:
        raise ValueError(f"family {family.name!r} is already registered or claims registered "
                         f"architectures {sorted(taken)}.")
    FAMILIES[family.name] = family
    return family


def supported_architectures() -> list[str]:
    return [architecture for family in FAMILIES.values() for architecture in family.architectures]


def family_named(name: str) -> Family:
    """The registered family called ``name`` (as a manifest records it)."""
    if name not in FAMILIES:
        raise UnsupportedModelError(f"model family {name!r} is not known to this covspec; known: "
                                    f"{', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_for_architecture(architecture: str) -> Family:
    """The family that loads ``architecture`` (a config.json ``architectures`` value)."""
    for family in FAMILIES.values():
        if architecture in family.architectures:
            return family
    raise UnsupportedModelError(f"architecture {architecture!r} is not supported; supported: "
                                f"{', '.join(supported_architectures())}.")


def family_for_model(model) -> Family:
    """The family of a loaded transformers model (by its class name)."""
    return family_for_architecture(type(model).__name__)


def family_for_folder(path: str | Path) -> Family:
    """The family of a local model folder: ``config.json`` of a supported architecture
    and weights, else ``ModelFolderError`` saying what is missing."""
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
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    try:
        family = family_for_architecture(architecture)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelFolderError(f"{path} has a config.json but no weights (*.safetensors).")
    return family


register(LLAVA)
register(ONEVISION)
register(IDEFICS3)
register(QWEN2VL)
register(GEMMA3)
