"""Torch-side helpers that build local model folders for tests and the toy world.

Owns how a LLaVA-architecture model folder is built and saved (word tokenizer, chat
template, processor files). Loading, prompting and everything else architecture-
specific belongs to the model families (``covspec.families``). Imports torch and
transformers lazily; the device side never imports it.
"""
