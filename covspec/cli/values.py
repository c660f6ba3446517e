"""Parsing of option values shared by the commands (click only)."""

from __future__ import annotations

import click


def positive_ints(text: str, name: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (``name``: the option, for the error)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=name) from None
    if not values or min(values) < 1:
        raise click.BadParameter("give positive integers", param_hint=name)
    return values


def chances(text: str, name: str) -> list[float]:
    """A comma-separated list of probabilities in [0, 1] (``name``: the option, for the error)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=name) from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise click.BadParameter("give one or more chances between 0 and 1", param_hint=name)
    return values
