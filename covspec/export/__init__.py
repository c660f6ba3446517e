"""PyTorch -> ONNX export of draft VLMs into device artifact folders (DESIGN.md section 9).

Modules, one job each: ``adapters`` (per-architecture wrappers), ``scorer`` (the
pruning scorer), ``graphs`` (torch.onnx export), ``onnx_run`` (numpy/onnxruntime
execution of an artifact, torch-free), ``quantize``, ``parity``, ``errors`` (typed
errors), ``pipeline`` (orchestration). ``covspec.protocol.manifest`` holds the
artifact contract shared with the device.
"""
