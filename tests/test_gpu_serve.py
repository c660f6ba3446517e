"""``covspec bench gpu``'s serving half (``covspec.bench.gpu.serve``) with the edge on
the CPU: the same code a CUDA machine runs, at tiny sizes."""

from __future__ import annotations


def test_the_serving_check_runs_on_cpu(tmp_path):
    """``bench gpu``'s serving half, with the edge on the CPU: the toy target under a short
    replay load and a tiny LLaVA drafting for itself, every answer the target's own."""
    from covspec.bench.gpu import serve as gpu_serve

    serve = gpu_serve.serve_check("cpu", tmp_path, levels=(2,), seconds=0.5)
    assert serve["tiny_llava"]["ok"] and serve["tiny_llava"]["device_led_drafted"] > 0
    assert [p["configuration"] for p in serve["toy_load"]] == ["target-only batched", "covspec batched"]
    assert all(p["all_correct"] and p["answers"] > 0 for p in serve["toy_load"])
    assert "tiny random LLaVA" in gpu_serve.markdown(serve).replace("Tiny", "tiny")
