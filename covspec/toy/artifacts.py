"""The toy draft's device artifacts (exported on first use, for the demo and benchmarks),
and the toy world's parity prompts for exporting any model that speaks its vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEFAULT_ARTIFACTS = Path("artifacts/toy-draft-int8")
PARITY_SCENES = 4


def speaks_toy_vocabulary(model_dir: Path) -> bool:
    """Whether the folder's ``tokenizer.json`` maps tokens to ids exactly as the toy tokenizer."""
    from tokenizers import Tokenizer

    from covspec.protocol.vocab import vocab_hash
    from covspec.toy.models import toy_tokenizer

    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return False
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    return vocab_hash(vocab) == vocab_hash(toy_tokenizer().get_vocab(with_added_tokens=True))


def parity_prompts(count: int = PARITY_SCENES) -> list:
    """Held-out ShapesVQA scenes 0..count-1 with the description question (``ParityPrompt``s)."""
    from covspec.export.parity import ParityPrompt
    from covspec.toy import shapes

    return [ParityPrompt(shapes.sample("test", i).image(), shapes.DESCRIBE_QUESTION, f"ShapesVQA test scene {i}")
            for i in range(count)]


def ensure_toy_artifacts(folder: Path = DEFAULT_ARTIFACTS, log: Callable[[str], None] = print) -> Path:
    """``folder`` if it holds a valid artifact of the bundled toy draft as it is now,
    else the toy draft exported there (int8)."""
    from covspec.export.pipeline import ExportOptions, export_model, source_hash
    from covspec.protocol.manifest import ArtifactError, load_manifest
    from covspec.toy.models import bundled_model_dir

    try:
        manifest = load_manifest(folder)
        if manifest.source["sha256"] == source_hash(bundled_model_dir("draft")) and manifest.conversation:
            return folder
        log(f"{folder} holds an older toy draft (or one exported before conversations); re-exporting")
    except ArtifactError:
        pass

    log(f"exporting the toy draft to {folder} (int8, once) ...")
    export_model(bundled_model_dir("draft"), folder, ExportOptions(quant="int8", force=True, embedding="float32"),
                 progress=lambda stage: log(f"  export: {stage}"), prompts=parity_prompts())
    return folder
