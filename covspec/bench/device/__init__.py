"""The draft on the device: ``covspec bench device`` (``size``) and its companions.

``size`` builds and exports a real-size random draft, runs ``probe`` on every artifact
(a process each), the onnxruntime-genai anchor and the bandwidth floor (``anchor``) and
``covspec device run`` itself (``run``). Run as modules: ``llamacpp`` (llama.cpp on real
weights), ``quality`` (int8/int4 agreement on real weights), ``arm`` (the runtime on
arm64, emulated; ``scripts/arm_device_check.sh``).
"""
