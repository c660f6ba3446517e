"""The toy draft's device artifacts, exported on first use (demo and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEFAULT_ARTIFACTS = Path("artifacts/toy-draft-int8")


def ensure_toy_artifacts(folder: Path = DEFAULT_ARTIFACTS, log: Callable[[str], None] = print) -> Path:
    """``folder`` if it holds a valid artifact of the bundled toy draft as it is now,
    else the toy draft exported there (int8)."""
    from covspec.export.pipeline import ExportOptions, export_model, source_hash
    from covspec.protocol.manifest import ArtifactError, load_manifest
    from covspec.toy.models import bundled_model_dir

    try:
        if load_manifest(folder).source["sha256"] == source_hash(bundled_model_dir("draft")):
            return folder
        log(f"{folder} holds an older toy draft; re-exporting")
    except ArtifactError:
        pass

    log(f"exporting the toy draft to {folder} (int8, once) ...")
    export_model(bundled_model_dir("draft"), folder, ExportOptions(quant="int8", force=True),
                 progress=lambda stage: log(f"  export: {stage}"))
    return folder
