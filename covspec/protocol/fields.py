"""How a message declares its fields beyond plain scalars: the protocol version a field
exists from (``since``), optional counters and flags that a message may omit, and array
fields (``covspec.protocol.messages`` reads this metadata to encode and decode).
"""

from __future__ import annotations

from dataclasses import field


def since(version: int, default):
    """A scalar field that exists from protocol ``version`` on (``default`` in older messages)."""
    return field(default=default, metadata={"since": version})


def counter(version: int):
    """An integer counter from protocol ``version`` on that a message may omit (0 when absent),
    so a side that counts more than an older peer stays readable by it and reads it."""
    return field(default=0, metadata={"since": version, "optional": True})


def flag(version: int):
    """A boolean from protocol ``version`` on that a message may omit (false when absent).
    It is sent only when true, so a message that does not use it reads as before."""
    return field(default=False, metadata={"since": version, "optional": True})


def array_field(dtype: str, ndim: int, optional: bool = False, since: int = 1):
    """A dataclass field holding an ndarray of a fixed dtype and rank (from protocol ``since`` on)."""
    meta = {"array": True, "dtype": dtype, "ndim": ndim, "since": since}
    if optional:
        return field(default=None, metadata=meta)
    return field(metadata=meta)
