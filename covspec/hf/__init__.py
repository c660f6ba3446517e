"""Torch-side helpers shared by the exporter, the edge and the toy world.

Owns how a local LLaVA-architecture model folder is built, saved, loaded and
prompted. Imports torch and transformers; the device side never imports it.
"""
