"""ONNX graph files of any size: protobuf caps one file at 2 GiB, so a graph whose
weights pass ``EXTERNAL_DATA_THRESHOLD`` bytes keeps them in one external data file
beside it, ``<graph file>.data`` (the ONNX external data format, which onnxruntime
reads relative to the graph's folder).

- ``save``: a graph into a file, external data or not by its size; ``load``: with its data;
- ``data_files``: the external data files a graph file references;
- ``replace``: move a graph (and its data, renamed to follow it) over another one;
- ``remove``: a graph file and its data; ``edit``: change a graph's proto in place;
- ``gather``: a graph written by an exporter into a folder of its own (the torchscript
  exporter writes one file per weight past 2 GiB) saved as one graph file (+ data).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

EXTERNAL_DATA_THRESHOLD = 1_800_000_000    # weight bytes above which a graph's weights go external
DATA_SUFFIX = ".data"


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers (raw data only: what the exporters write)."""
    return sum(len(init.raw_data) for init in model.graph.initializer)


def load(path: str | Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def save(model: onnx.ModelProto, path: str | Path) -> None:
    """Save ``model`` at ``path``; with its weights in ``<name>.data`` if they pass the threshold."""
    path = Path(path)
    for stale in data_files(path) if path.is_file() else []:
        (path.parent / stale).unlink(missing_ok=True)
    data = path.with_name(path.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)                 # onnx appends to an existing data file
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def data_files(path: str | Path) -> list[str]:
    """Names (relative to the graph's folder) of the external data files ``path`` references."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            names.update(entry.value for entry in init.external_data if entry.key == "location")
    return sorted(names)


def uses_external(path: str | Path) -> bool:
    return bool(data_files(path))


def edit(path: str | Path, change) -> None:
    """Apply ``change(model)`` to the graph's proto and save it in place; external data,
    not loaded, stays where it is."""
    model = onnx.load(str(path), load_external_data=False)
    change(model)
    onnx.save_model(model, str(path))


def remove(path: str | Path) -> None:
    """Delete a graph file and its external data."""
    path = Path(path)
    if path.is_file():
        for name in data_files(path):
            (path.parent / name).unlink(missing_ok=True)
        path.unlink()


def replace(source: str | Path, target: str | Path) -> None:
    """Move the graph at ``source`` to ``target`` (removing what was there), its data renamed with it."""
    source, target = Path(source), Path(target)
    remove(target)
    if not uses_external(source):
        source.replace(target)
        return
    save(load(source), target)
    remove(source)


def gather(folder: str | Path, graph_name: str, target: str | Path) -> None:
    """Save the graph ``folder/graph_name`` (its weights wherever its exporter put them) at
    ``target``, then delete ``folder``."""
    folder = Path(folder)
    source = folder / graph_name
    if uses_external(source) or source.stat().st_size > EXTERNAL_DATA_THRESHOLD:
        save(load(source), target)
    else:
        source.replace(target)
    shutil.rmtree(folder)
