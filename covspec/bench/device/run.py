"""`covspec device run` itself on a real-size artifact: its peak RSS, lean and resident.

``device_run(model_folder, artifact, out)`` serves the artifact's own model folder as the
target (``covspec edge serve``, one torch thread: the random-weight model the artifact
was exported from) and answers one question about a 640x480 image with ``covspec
device run --json`` twice, ``--memory lean`` and ``--memory resident``, each a process
of its own; it reports each run's peak RSS (``VmHWM``), first-token time, wall time and
tokens, and whether both answers are the same (they must be: memory changes nothing
else).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

QUESTION = "what color is the circle ?"
MEMORY_MODES = ("lean", "resident")


def device_run(model_folder: Path, artifact: Path, out: Path, *, threads: int = 1, max_new_tokens: int = 16,
               log=print) -> dict:
    from PIL import Image

    from covspec.runtime_edge import EdgeProcess, ServerConfig

    out.mkdir(parents=True, exist_ok=True)
    image = out / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
    result = {"question": QUESTION, "max_new_tokens": max_new_tokens, "threads": threads}
    log("serving the model as the target for covspec device run ...")
    with EdgeProcess(model_folder, ServerConfig(bind="tcp://127.0.0.1:*", threads=1), startup_timeout=600,
                     log_path=out / "edge.log") as edge:
        for memory in MEMORY_MODES:
            log(f"  covspec device run --memory {memory} ...")
            done = subprocess.run(
                [sys.executable, "-m", "covspec", "device", "run", "--artifacts", str(artifact),
                 "--edge", edge.address, "--image", str(image), "--prompt", QUESTION, "--max-new-tokens",
                 str(max_new_tokens), "--threads", str(threads), "--memory", memory, "--timeout", "600", "--json"],
                capture_output=True, text=True)
            if done.returncode != 0:
                result[memory] = {"error": done.stderr.strip()[-1500:]}
                continue
            report = json.loads(done.stdout.strip().splitlines()[-1])
            result[memory] = {key: report.get(key) for key in ("peak_rss_mb", "ttft_s", "wall_s", "tokens",
                                                               "device_prefill_s", "token_ids")}
    answers = [result[m].get("token_ids") for m in MEMORY_MODES if "error" not in result[m]]
    result["same_answer"] = len(answers) == len(MEMORY_MODES) and all(a == answers[0] for a in answers)
    return result
