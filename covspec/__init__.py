"""covspec: device-edge speculative decoding for vision-language models (CoVSpec).

The package is split by process (ARCHITECTURE.md, "Processes"): ``protocol`` is numpy-only
and shared by both sides; ``runtime_device`` never imports torch or transformers;
``runtime_edge``, ``export``, ``hf`` and ``toy`` are the torch side.
"""

__version__ = "0.1.0"
