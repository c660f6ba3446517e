"""PyTorch -> ONNX export of draft VLMs into device artifact folders (ARCHITECTURE.md, "Artifacts").

Family-agnostic: what is specific to an architecture (the modules to trace, the
manifest's image and tokenizer sections) comes from the model's family
(``covspec.families``). Modules, one job each: ``scorer`` (the pruning scorer),
``graphs`` (torch.onnx export), ``quantize``, ``parity`` (the exported graphs run
through the device's own drafter, against PyTorch), ``errors`` (typed errors),
``pipeline`` (orchestration). ``covspec.protocol.manifest`` holds the artifact
contract shared with the device.
"""
