"""The deployment regime: what the real system's calls would take on a phone and an edge GPU.

A regime (``DEVICE@TARGET``, or a JSON profile file) names a phone-class device and a
target model served on a GPU (``profiles``). ``roofline`` turns the shape of each call
into the time the named hardware would take: the draft's vision per frame, LM prefill
per row and decode step per run; the target's forward by a roofline over weight and KV
bytes and FLOPs, as a function of batch rows, new tokens and context. ``pacing`` pads
each real call to that time and never shortens one: a call whose real compute already
exceeds the emulated time is an overrun, counted and reported. ``plan`` is the
analytic model of time-to-answer built on the same profiles.

Numpy and the standard library only: both runtimes import this package, and the
device never imports torch.
"""

from covspec.regime.pacing import NO_PACING, DevicePacing, EdgePacing, Pacer
from covspec.regime.profiles import DeviceProfile, Regime, RegimeError, TargetProfile, builtin_regimes, load_regime


def device_pacing(regime: str | None):
    """The draft's pacing under ``regime`` (``NO_PACING`` without one); ``RegimeError`` for a bad one."""
    return DevicePacing(load_regime(regime).device) if regime else NO_PACING


__all__ = ["DevicePacing", "DeviceProfile", "EdgePacing", "Pacer", "Regime", "RegimeError", "TargetProfile",
           "builtin_regimes", "device_pacing", "load_regime"]
