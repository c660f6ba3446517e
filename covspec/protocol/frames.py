"""The frame layer of the protocol: a header frame's JSON parsed within limits, its
scalar fields type-checked, and raw array frames read by their declared dtype and
shape. Types are strict: an ``int`` field takes a JSON integer only (not ``1.0``, not
``true``), a ``bool`` field ``true``/``false`` only, a ``str`` field a string that UTF-8
can encode (no lone surrogates such as ``"\ud800"``); a ``float`` field takes any finite
JSON number (JSON encoders write ``1.0`` as ``1``). Every problem is one ``ProtocolError`` whose ``code`` (``covspec.protocol.errors``)
names the class of problem; nothing is unpickled or evaluated.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from covspec.protocol import errors

INT_RANGE = (-(2 ** 63), 2 ** 64)          # integer fields: int64, or uint64 for seeds
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_SCALAR_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


class ProtocolError(ValueError):
    """A message that cannot be accepted. ``code`` is a stable machine-readable label."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Size bounds enforced while decoding (before any array is materialized)."""

    max_header_bytes: int = 64 * 1024
    max_header_depth: int = 8              # nesting of JSON objects/arrays (a header needs 3)
    max_array_bytes: int = 32 * 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024


def require(condition: bool, code: str, message: str) -> None:
    if not condition:
        raise ProtocolError(code, message)


def parse_header(frame: bytes, limits: Limits = Limits()) -> dict:
    """The JSON object of a header frame, parsed only within the size and nesting limits."""
    raw = bytes(frame)
    require(len(raw) <= limits.max_header_bytes, errors.TOO_LARGE,
             f"header is {len(raw)} bytes; the limit is {limits.max_header_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(errors.BAD_JSON, f"header frame is not UTF-8 ({exc})") from None
    depth = _nesting_depth(text)
    require(depth <= limits.max_header_depth, errors.BAD_JSON,
             f"header nests {depth} levels deep; the limit is {limits.max_header_depth}")
    try:
        header = json.loads(text)
    except ValueError as exc:          # JSONDecodeError, and integers beyond Python's digit limit
        raise ProtocolError(errors.BAD_JSON, f"header frame is not usable JSON ({exc})") from None
    require(isinstance(header, dict), errors.BAD_JSON, "header must be a JSON object")
    return header


def scalar(header: dict, name: str, kind: type) -> Any:
    require(name in header, errors.MISSING_FIELD, f"header needs the field {name!r}")
    value = header[name]
    ok = isinstance(value, _SCALAR_TYPES[kind]) and not (kind is not bool and isinstance(value, bool))
    require(ok, errors.BAD_FIELD, f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if kind is str:
        require(_utf8(value), errors.BAD_FIELD, f"field {name!r} is not valid Unicode (it holds a lone surrogate "
                                                "such as \\ud800, which UTF-8 cannot encode); send real text")
    if kind is int:
        require(INT_RANGE[0] <= value < INT_RANGE[1], errors.BAD_FIELD, f"field {name!r} is beyond 64 bits")
    if kind is float:
        try:
            value = float(value)
        except OverflowError:
            raise ProtocolError(errors.BAD_FIELD, f"field {name!r} is beyond the float range") from None
        require(math.isfinite(value), errors.BAD_FIELD, f"field {name!r} must be a finite number")
    return value


def is_int(value: Any) -> bool:
    """Whether ``value`` is a JSON integer: an int, not a bool, not a float equal to an int."""
    return type(value) is int


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_array(name: str, spec: dict, frame: bytes, limits: Limits) -> np.ndarray:
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    require(max(spec["shape"], default=0) <= limits.max_array_bytes, errors.TOO_LARGE,   # even when empty
             f"array {name!r} declares a dimension beyond {limits.max_array_bytes}")
    expected = math.prod(spec["shape"]) * dtype.itemsize          # exact: Python integers never overflow
    require(expected <= limits.max_array_bytes, errors.TOO_LARGE,
             f"array {name!r} declares {expected} bytes; the limit is {limits.max_array_bytes}")
    require(len(frame) == expected, errors.BAD_ARRAY,
             f"array {name!r} declares {spec['shape']} {spec['dtype']} = {expected} bytes "
             f"but its frame has {len(frame)}")
    return np.frombuffer(frame, dtype=dtype).reshape(spec["shape"]).astype(spec["dtype"])


def _nesting_depth(text: str) -> int:
    """How deeply the JSON ``text`` nests objects and arrays (string contents ignored),
    counted without parsing, so no parser recursion is ever reached."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest
