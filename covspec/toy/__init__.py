"""The ShapesVQA toy world: procedural data, and small trained LLaVA target and draft models.

``shapes`` makes scenes, questions and answers; ``models`` defines the two models and
their tokenizer; ``train``/``build`` train them; ``evaluate`` measures them through
plain transformers. Trained folders are bundled under ``models/target`` and
``models/draft``, demo images under ``samples/``.
"""
