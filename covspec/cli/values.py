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
