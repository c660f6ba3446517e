"""The serving half of ``covspec bench gpu``: the edge on the GPU, end to end.

``serve_check(device, workdir, ...)`` runs two short checks against ``covspec edge
serve --device DEVICE`` (a child process, as in production):

- the toy target through a short load run (``covspec.bench.capacity.load``: replay devices
  sending the real int8 draft's chunks; target-only batched and CoVSpec batched at a few
  device counts), every answer checked against the target's own;
- a tiny random LLaVA (built from a config, no weights needed) served to a real device
  drafting for itself (an fp32 self-draft export), greedy answers equal to the
  target's own ``generate()`` on the same device, edge-led and device-led; the
  device-led answers must have drafted, or that half proves nothing about verification.

It returns a JSON-ready dict for the report's ``serve`` section; ``markdown`` renders
it. On CPU (``device="cpu"``) it runs the same code, which is how it is tested here.
"""

from __future__ import annotations

from pathlib import Path

from covspec.bench.capacity.load import BATCHED, TARGET_ONLY, CapacityPlan, measure_phase, prepare_tables
from covspec.runtime_edge import EdgeProcess, ServerConfig

QUESTION = "what color is the circle ?"


def serve_check(device: str, workdir: Path, *, levels: tuple[int, ...] = (1, 8), seconds: float = 3.0,
                artifacts: Path = Path("artifacts/toy-draft-int8")) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    return {"device": device, "toy_load": toy_load(device, workdir, levels, seconds, artifacts),
            "tiny_llava": tiny_llava(device, workdir)}


def toy_load(device: str, workdir: Path, levels: tuple[int, ...], seconds: float, artifacts: Path) -> list[dict]:
    """Target-only and CoVSpec batched, replay devices, toy pair, the edge on ``device``."""
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.toy.artifacts import ensure_toy_artifacts
    from covspec.toy.models import bundled_model_dir

    plan = CapacityPlan(levels=levels, seconds=seconds, questions=4, max_new_tokens=48, agreement_levels=())
    target = bundled_model_dir("target")
    tables = prepare_tables(plan, DraftArtifact.load(ensure_toy_artifacts(artifacts, lambda line: None)), target)
    phases = []
    for configuration in (TARGET_ONLY, BATCHED):
        edge = EdgeProcess(target, ServerConfig(bind="tcp://127.0.0.1:*", device=device,
                                                max_batch=configuration.max_batch),
                           log_path=workdir / "edge.log").start()
        try:
            for count in levels:
                phases.append(measure_phase(configuration, count, "descriptions", tables["descriptions"],
                                            edge.address, edge.pid, plan))
        finally:
            edge.stop()
    return phases


def tiny_llava(device: str, workdir: Path, prompts: int = 3, max_new_tokens: int = 16) -> dict:
    """A tiny random LLaVA on the edge, drafting for itself: answers equal ``generate()``,
    and the device-led answers drafted (``device_led_drafted`` > 0, else not ``ok``)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from covspec.export.pipeline import ExportOptions, export_model
    from covspec.families import family_for_folder
    from covspec.hf.tiny import save_tiny_llava
    from covspec.runtime_device.artifact import DraftArtifact
    from covspec.runtime_device.client import EdgeClient, Backoff
    from covspec.runtime_device.engine import CoInference
    from covspec.runtime_device.options import DraftingOptions, GenerationSettings
    from covspec.runtime_device.stats import GenerationStats

    folder = save_tiny_llava(workdir / "tiny-llava", seed=5)
    export_model(folder, workdir / "tiny-llava-self", ExportOptions(quant="fp32"))
    family = family_for_folder(folder)
    model, processor = family.load(folder, device=device)
    context = family.target(model, processor)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    images = []
    for seed in range(prompts):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, (40 + 9 * seed, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    references = []
    with torch.inference_mode():
        for image in images:
            inputs = context.context(QUESTION, Image.open(io.BytesIO(image))).inputs
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            references.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    del model
    results = {"prompts": prompts, "edge_led_equal": 0, "device_led_equal": 0, "device_led_drafted": 0}
    edge = EdgeProcess(folder, ServerConfig(bind="tcp://127.0.0.1:*", device=device),
                       log_path=workdir / "edge-tiny.log").start()
    client = EdgeClient(edge.address, Backoff(timeout_s=30.0))
    try:
        engine = CoInference(DraftArtifact.load(workdir / "tiny-llava-self"), client)
        for lead in ("edge", "device"):
            for image, reference in zip(images, references):
                stats = GenerationStats()
                answer = [t for chunk in engine.generate(image, QUESTION, settings, DraftingOptions(lead=lead), stats)
                          for t in chunk]
                results[f"{lead}_led_equal"] += answer == reference
                results["device_led_drafted"] += stats.drafted if lead == "device" else 0
    finally:
        client.close()
        edge.stop()
    results["ok"] = results["edge_led_equal"] == results["device_led_equal"] == prompts \
        and results["device_led_drafted"] > 0
    return results


def markdown(serve: dict) -> str:
    lines = [f"Edge on {serve['device']}: the toy target under load (replay devices, descriptions)", "",
             "| configuration | devices | aggregate tok/s | forwards / token | answers correct |", "|---|---|---|---|---|"]
    for phase in serve["toy_load"]:
        per_token = "-" if phase["forwards_per_token"] is None else f"{phase['forwards_per_token']:.3f}"
        lines.append(f"| {phase['configuration']} | {phase['devices']} | {phase['tokens_per_s']:.0f} | "
                     f"{per_token} | {phase['correct']}/{phase['answers']} |")
    tiny = serve["tiny_llava"]
    lines += ["", f"Tiny random LLaVA drafting for itself: {tiny['edge_led_equal']}/{tiny['prompts']} edge-led and "
                  f"{tiny['device_led_equal']}/{tiny['prompts']} device-led answers equal the target's generate()."]
    return "\n".join(lines)
