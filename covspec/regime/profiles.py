"""Regime profiles: a phone-class device and a target model on a GPU, with their sources.

``load_regime(spec)`` takes ``DEVICE@TARGET`` (names from ``profiles.json``, beside this
module: ``builtin_regimes()`` lists the benchmarked pairs) or the path of a JSON file
holding ``{"name": ..., "device": {...}, "target": {...}}`` with the same fields as the
built-in profiles. Every built-in number cites its source in ``profiles.json``. A
profile that is missing a field or holds a non-positive time is a ``RegimeError`` that
names the field, before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROFILES = Path(__file__).with_name("profiles.json")


class RegimeError(ValueError):
    """A regime name or profile file that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceProfile:
    """A phone-class device running the draft: milliseconds on the bench machine times
    ``phone_factor`` (the device's speed relative to it)."""

    name: str
    phone_factor: float
    vision_frame_ms: float        # one vision run over one tile or frame
    prefill_token_ms: float       # one row of a prefill run
    decode_step_ms: float         # one decoder run of one row
    decode_row_ms: float          # each further row of a decoder run after the context

    def __post_init__(self) -> None:
        _positive(self, ("phone_factor", "vision_frame_ms", "prefill_token_ms", "decode_step_ms", "decode_row_ms"))


@dataclass(frozen=True)
class TargetProfile:
    """A target model served by an engine on one GPU."""

    name: str
    params_b: float               # parameters, billions
    layers: int
    hidden: int
    kv_dim: int                   # key (= value) width per layer: KV heads x head size
    bytes_per_param: float
    bandwidth_gbs: float          # GPU memory bandwidth, datasheet
    peak_tflops: float            # GPU dense BF16 peak, datasheet
    bandwidth_efficiency: float   # fraction of the bandwidth a forward reaches
    compute_efficiency: float     # fraction of the peak a compute-bound forward reaches
    layer_overhead_ms: float      # the engine's fixed cost per layer per forward (launches, host work)
    vision_ms: float              # the target's vision tower, once per image

    def __post_init__(self) -> None:
        _positive(self, ("params_b", "layers", "hidden", "kv_dim", "bytes_per_param", "bandwidth_gbs",
                         "peak_tflops", "bandwidth_efficiency", "compute_efficiency"))
        if self.layer_overhead_ms < 0 or self.vision_ms < 0:
            raise RegimeError(f"target profile {self.name!r}: layer_overhead_ms and vision_ms must be >= 0")


@dataclass(frozen=True)
class Regime:
    """A device and a target; ``name`` labels every table measured under it."""

    name: str
    device: DeviceProfile
    target: TargetProfile

    def describe(self) -> dict:
        """The profile as JSON-ready data, for the benchmarks' records."""
        return dataclasses.asdict(self)


def _positive(profile, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(profile, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise RegimeError(f"profile {profile.name!r}: {name} must be a positive number, got {value!r}")


@lru_cache(maxsize=1)
def _builtin() -> dict:
    return json.loads(PROFILES.read_text())


def builtin_regimes() -> list[str]:
    """The regimes the benchmarks measure by default."""
    return list(_builtin()["regimes"])


def device_names() -> list[str]:
    return sorted(_builtin()["devices"])


def target_names() -> list[str]:
    return sorted(_builtin()["targets"])


def device_profile(name: str) -> DeviceProfile:
    devices = _builtin()["devices"]
    if name not in devices:
        raise RegimeError(f"unknown device profile {name!r}; built-in: {', '.join(device_names())}")
    return _build(DeviceProfile, name, devices[name])


def target_profile(name: str) -> TargetProfile:
    data = _builtin()
    if name not in data["targets"]:
        raise RegimeError(f"unknown target profile {name!r}; built-in: {', '.join(target_names())}")
    parts = data["targets"][name]
    fields = {**data["models"][parts["model"]], **data["gpus"][parts["gpu"]], **data["engines"][parts["engine"]]}
    return _build(TargetProfile, name, fields)


def _build(cls, name: str, fields: dict):
    names = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    missing = [n for n in names if n not in fields]
    if missing:
        raise RegimeError(f"profile {name!r} lacks {', '.join(missing)} (a {cls.__name__} needs {', '.join(names)})")
    return cls(name=name, **{n: fields[n] for n in names})


def load_regime(spec: str) -> Regime:
    """``DEVICE@TARGET`` (built-in names) or a JSON profile file -> a ``Regime``."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise RegimeError(f"regime file {spec} does not exist; give DEVICE@TARGET or a JSON profile file")
        try:
            data = json.loads(path.read_text())
            return Regime(str(data.get("name", path.stem)), _build(DeviceProfile, "device", data["device"]),
                          _build(TargetProfile, "target", data["target"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RegimeError(f"regime file {spec}: {exc!s}; it needs 'device' and 'target' objects "
                              "with the fields of covspec/regime/profiles.json") from None
    device, sep, target = spec.partition("@")
    if not sep:
        raise RegimeError(f"regime {spec!r}: give DEVICE@TARGET (devices: {', '.join(device_names())}; "
                          f"targets: {', '.join(target_names())}) or a JSON profile file")
    return Regime(spec, device_profile(device), target_profile(target))
