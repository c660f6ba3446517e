"""The device runtime: onnxruntime draft, token pruning, drafting loop, edge client.

Imports numpy, onnxruntime, tokenizers, pillow, pyzmq and click only; never torch
or transformers (a test runs the whole device path where importing torch fails).
"""
