"""Sections of BENCHMARKS.md: each bench command writes its numbers under a title of its own.

``append_markdown(path, title, command, body)`` puts ``## title`` with the command line
and the machine (``environment()``: architecture, cores, versions, date) before the body,
in place of an earlier section of that title (a re-run replaces its old numbers), else
at the end of the file.
"""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path


def environment() -> str:
    import onnxruntime
    import zmq

    versions = [f"python {platform.python_version()}", f"onnxruntime {onnxruntime.__version__}",
                f"pyzmq {zmq.__version__}"]
    try:
        import torch
        import transformers
        versions += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    except ImportError:
        pass
    cores = __import__("os").cpu_count()             # the machine's, whatever this process is pinned to
    return (f"{platform.machine()} CPU, {cores} cores, {platform.system()} ({', '.join(versions)}), "
            f"{datetime.date.today().isoformat()}")


def append_markdown(path: Path, title: str, command: str, body: str) -> None:
    """Write the section ``## title`` into ``path``: in place of an earlier section of
    that title (a re-run replaces its old numbers), else at the end."""
    section = f"## {title}\n\nCommand: `{command}`  \nMachine: {environment()}\n\n{body}\n\n"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    earlier = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    text, replaced = earlier.subn(lambda _: section, text, count=1)
    if not replaced:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
