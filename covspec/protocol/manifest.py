"""The artifact manifest: what `covspec export` writes and the device checks.

An artifact folder holds ONNX graphs (``vision``, ``scorer``, ``decoder``), the token
embedding table (``embed_tokens.npy``), ``tokenizer.json`` and ``manifest.json``.
The manifest names every other file with its sha256 and size, the graphs' input and
output names, the decoder's cache layout, tokenizer ids and vocabulary hash, the
model family (``source.family``) with its image preprocessing section, the prompt
template, pruning defaults and the export's parity report (ARCHITECTURE.md, "Artifacts").

``load_manifest`` refuses an artifact with a missing file, a hash or size mismatch,
another format or format version, or a missing field, by raising one typed
``ArtifactError`` that names the file or field. Standard library only: the device
imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "covspec-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRAPH_NAMES = ("vision", "scorer", "decoder")


class ArtifactError(ValueError):
    """An artifact folder or its manifest is missing, corrupted or incompatible."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {sha256, bytes}}`` for every file in ``folder`` except the manifest."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


@dataclass
class Manifest:
    """The parsed ``manifest.json``. Nested sections stay plain dicts (JSON objects)."""

    created: str
    covspec_version: str
    source: dict[str, Any]
    quantization: dict[str, Any]
    opset: int
    graph_format: str  # "onnx" or "ort" ("format" names the artifact format itself)
    files: dict[str, dict[str, Any]]
    graphs: dict[str, dict[str, Any]]
    decoder: dict[str, Any]
    embedding: dict[str, Any]
    tokenizer: dict[str, Any]
    image: dict[str, Any]
    num_visual_tokens: int
    prompt_template: str
    conversation: dict[str, str] | None = None      # the template's ChatTurns (covspec/families/chat.py); None: none
    pruning: dict[str, Any] = field(default_factory=lambda: {"keep_ratio": 1.0})
    parity: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # Required keys of the nested sections the device relies on.
    REQUIRED = {
        "source": ("path", "sha256", "family", "architecture"),
        "quantization": ("scheme",),
        "decoder": ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                    "past_input_names", "present_output_names", "kv_cache"),
        "embedding": ("file", "dtype", "shape"),
        "tokenizer": ("file", "vocab_size", "vocab_hash", "bos_id", "eos_ids", "pad_id", "image_token_id"),
        "image": (),  # its keys are the family's (checked by the family's device half)
    }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format": FORMAT, "format_version": data.pop("format_version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate and parse; raises ``ArtifactError`` naming the first bad field."""
        if not isinstance(data, dict):
            raise ArtifactError("manifest.json: the top level must be a JSON object.")
        if data.get("format") != FORMAT:
            raise ArtifactError(f"manifest.json: field 'format' is {data.get('format')!r}, expected {FORMAT!r}.")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"manifest.json: field 'format_version' is {data.get('format_version')!r}; this covspec "
                f"reads version {FORMAT_VERSION}. Re-export the model with this covspec version.")
        names = [f.name for f in dataclasses.fields(cls)]
        optional = {f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        for name in names:
            if name not in data and name not in optional:
                raise ArtifactError(f"manifest.json: missing field {name!r}.")
        for section, keys in cls.REQUIRED.items():
            if not isinstance(data[section], dict):
                raise ArtifactError(f"manifest.json: field {section!r} must be an object.")
            for key in keys:
                if key not in data[section]:
                    raise ArtifactError(f"manifest.json: missing field '{section}.{key}'.")
        for graph in GRAPH_NAMES:
            spec = data["graphs"].get(graph)
            if not isinstance(spec, dict) or not {"file", "inputs", "outputs"} <= spec.keys():
                raise ArtifactError(f"manifest.json: field 'graphs.{graph}' needs file, inputs and outputs.")
        if data["graph_format"] not in ("onnx", "ort"):
            raise ArtifactError(f"manifest.json: field 'graph_format' is {data['graph_format']!r}, "
                                "expected 'onnx' or 'ort'.")
        return cls(**{name: data[name] for name in names if name in data})

    def graph_path(self, folder: str | Path, graph: str) -> Path:
        """Path of ``graph`` ("vision", "scorer", "decoder") in the manifest's graph format."""
        spec = self.graphs[graph]
        return Path(folder) / (spec.get("ort_file", spec["file"]) if self.graph_format == "ort" else spec["file"])


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``folder`` (``files`` must already describe the folder)."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def load_manifest(folder: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and validate an artifact folder's manifest; check every file's size and hash."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST_FILE}; is this a `covspec export` artifact folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}).") from exc
    manifest = Manifest.from_dict(data)
    referenced = [spec["file"] for spec in manifest.graphs.values()]
    referenced += [manifest.embedding["file"], manifest.tokenizer["file"]]
    for name in referenced:
        if name not in manifest.files:
            raise ArtifactError(f"manifest.json: file {name!r} is used but not listed in 'files'.")
    for name, entry in manifest.files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"manifest.json: file name {name!r} points outside the artifact folder.")
        if not isinstance(entry, dict) or not {"sha256", "bytes"} <= entry.keys():
            raise ArtifactError(f"manifest.json: field 'files.{name}' needs sha256 and bytes.")
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{folder}: file {name!r} listed in the manifest is missing.")
        if file.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"{folder}: file {name!r} has {file.stat().st_size} bytes, "
                                f"the manifest says {entry['bytes']} (corrupted or replaced).")
        if verify_hashes and sha256_file(file) != entry["sha256"]:
            raise ArtifactError(f"{folder}: file {name!r} does not match its sha256 in the manifest "
                                "(corrupted or replaced).")
    return manifest
