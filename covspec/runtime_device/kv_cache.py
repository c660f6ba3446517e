"""The draft decoder's KV cache on the device: how the past reaches onnxruntime and back.

Two strategies with one interface (``rows``, ``reset``, ``run``, ``truncate``,
``snapshot``, ``restore``); the ``Drafter`` picks one from the manifest's
``decoder.kv_cache``:

- ``SharedBufferCache`` (a ``"shared-buffer"`` decoder: GroupQueryAttention graphs):
  one preallocated buffer per past input, [1, KVH, C, HD] float32, bound as both the
  past input and the present output (preallocated fetches of
  ``run_with_ortvaluevector``, which unlike ``io_binding`` also takes the graph's
  optional ``num_logits`` input; the logits land in a fresh array). onnxruntime writes the S new
  rows at ``rows..rows+S-1`` in place and reads only rows below ``rows+S``, so a step
  copies nothing; ``truncate`` only lowers ``rows``. The buffers grow (doubling, a copy)
  when a step would pass the capacity. Forks are copy-on-write: a snapshot copies
  nothing when taken; before a step or a restore overwrites rows a live snapshot still
  needs, those rows (and only those) are copied into it. A snapshot taken before the
  last ``reset`` (a new prefill) can no longer be restored.
- ``CopyingCache`` (a ``"concat"`` decoder, e.g. one whose mask GroupQueryAttention
  cannot express, or a session without IO binding): the past as numpy arrays fed to
  every run, the presents kept as the new past; a snapshot is a list of references
  (onnxruntime returns fresh arrays and truncation only slices).

Numpy and onnxruntime only.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

ROW_BLOCK = 256          # capacities are multiples of this many rows
HEADROOM = 256           # rows reserved beyond the first step (generated tokens)


class CopyingCache:
    """The past as numpy arrays, fed to ``run`` and replaced by its presents."""

    def __init__(self, decoder, past_names: Sequence[str], present_names: Sequence[str], kv_heads: int,
                 head_dim: int):
        self.decoder = decoder
        self.past_names, self.present_names = list(past_names), list(present_names)
        self.kv_shape = (1, kv_heads, 0, head_dim)
        self.arrays: list[np.ndarray] = []
        self.reset()

    @property
    def rows(self) -> int:
        return int(self.arrays[0].shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes the cache's arrays hold."""
        return sum(kv.nbytes for kv in self.arrays)

    def reset(self) -> None:
        self.arrays = [np.zeros(self.kv_shape, np.float32) for _ in self.past_names]

    def run(self, feeds: Mapping[str, np.ndarray], rows_out: int | None = None) -> np.ndarray:
        """One decoder run on ``feeds`` (without the past) -> logits [R, V]; the cache grows by S."""
        feeds = dict(feeds)
        for name, kv in zip(self.past_names, self.arrays):
            feeds[name] = np.ascontiguousarray(kv)
        outputs = self.decoder.run(["logits"] + self.present_names, feeds)
        self.arrays = outputs[1:]
        return outputs[0][0]

    def truncate(self, rows: int) -> None:
        self.arrays = [kv[:, :, :rows] for kv in self.arrays]

    def snapshot(self) -> tuple:
        return tuple(self.arrays)

    def restore(self, snapshot: tuple) -> None:
        self.arrays = list(snapshot)


@dataclass(eq=False)
class BufferFork:
    """A copy-on-write fork of a ``SharedBufferCache``: its first ``saved_from`` rows are
    still in the live buffers; rows ``saved_from..rows-1`` were copied into ``saved``."""

    rows: int
    epoch: int
    saved_from: int
    saved: list = field(default_factory=list)     # per past input [1, KVH, rows - saved_from, HD]


class SharedBufferCache:
    """Preallocated KV buffers bound as past and present of every run (no per-step copy)."""

    def __init__(self, decoder, past_names: Sequence[str], present_names: Sequence[str], kv_heads: int,
                 head_dim: int, vocab_size: int):
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector

        self._ort = ort
        self.decoder = decoder
        self.past_names, self.present_names = list(past_names), list(present_names)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.buffers: list[np.ndarray] = []      # [1, KVH, C, HD] per past input
        self.capacity = 0
        self.rows = 0
        self.epoch = 0
        self._forks: weakref.WeakSet[BufferFork] = weakref.WeakSet()
        self._values: list = []
        self._ones = np.ones((1, 0), np.int64)
        self.vocab_size = vocab_size
        self._fetch_names = ["logits", *self.present_names]
        self._devices = [ort.OrtDevice.make("cpu", 0)._get_c_device()] * len(self._fetch_names)
        self._run_options = getattr(decoder, "run_options", None) or ort.RunOptions()   # the Graph's: interruptible
        self._vector = OrtValueVector

    @property
    def nbytes(self) -> int:
        """Bytes the preallocated buffers hold (their capacity, not just the rows in use)."""
        return sum(buffer.nbytes for buffer in self.buffers)

    def reset(self) -> None:
        """Forget every row (a new prefill); earlier snapshots can no longer be restored."""
        self.rows = 0
        self.epoch += 1

    def run(self, feeds: Mapping[str, np.ndarray], rows_out: int | None = None) -> np.ndarray:
        """One decoder run on ``feeds`` (without the past and the mask) -> logits [R, V] (R:
        ``rows_out``, default S); the S new rows land at ``rows..rows+S-1`` in place."""
        new = int(feeds["inputs_embeds"].shape[1])
        total = self.rows + new
        self._reserve(total)
        self._protect(self.rows)
        if self._ones.shape[1] < total:
            self._ones = np.ones((1, self.capacity), np.int64)
        ort = self._ort
        names, values = [], self._vector()
        for name, value in {**feeds, "attention_mask": self._ones[:, :total]}.items():
            names.append(name)
            values.push_back(ort.OrtValue.ortvalue_from_numpy(np.require(value, requirements='C'))._ortvalue)
        for name, value in zip(self.past_names, self._values):
            names.append(name)
            values.push_back(value._ortvalue)
        logits = np.empty((1, rows_out or new, self.vocab_size), np.float32)      # a fresh array per run
        fetches = self._vector()
        fetches.push_back(ort.OrtValue.ortvalue_from_numpy(logits)._ortvalue)
        for value in self._values:
            fetches.push_back(value._ortvalue)                 # present = past: written in place
        self.decoder.run_with_ortvaluevector(self._run_options, names, values, self._fetch_names, fetches,
                                             self._devices)
        self.rows = total
        return logits[0]

    def truncate(self, rows: int) -> None:
        self.rows = rows

    def snapshot(self) -> BufferFork:
        fork = BufferFork(rows=self.rows, epoch=self.epoch, saved_from=self.rows)
        self._forks.add(fork)
        return fork

    def restore(self, fork: BufferFork) -> None:
        if fork.epoch != self.epoch:
            raise ValueError("this snapshot was taken before the last prefill; it cannot be restored.")
        self._protect(fork.saved_from, keep=fork)
        self._reserve(fork.rows)
        for buffer, saved in zip(self.buffers, fork.saved):
            buffer[:, :, fork.saved_from:fork.rows] = saved
        self.rows = fork.rows

    def _protect(self, start: int, keep: BufferFork | None = None) -> None:
        """Rows ``start..`` are about to be overwritten: copy them into every live fork of
        this epoch that still reads them from the buffers."""
        for fork in list(self._forks):
            if fork is keep or fork.epoch != self.epoch or fork.saved_from <= start:
                continue
            copied = [buffer[:, :, start:fork.saved_from].copy() for buffer in self.buffers]
            fork.saved = [np.concatenate([new, old], 2) for new, old in zip(copied, fork.saved)] \
                if fork.saved else copied
            fork.saved_from = start

    def _reserve(self, rows: int) -> None:
        """Make the capacity at least ``rows`` (keeping every row held now); rebinds."""
        if rows <= self.capacity:
            return
        first = self.capacity == 0
        wanted = rows + HEADROOM if first else max(rows, 2 * self.capacity)
        capacity = -(-wanted // ROW_BLOCK) * ROW_BLOCK
        buffers = [np.zeros((1, self.kv_heads, capacity, self.head_dim), np.float32) for _ in self.past_names]
        for new, old in zip(buffers, self.buffers):
            new[:, :, :self.capacity] = old
        self.buffers, self.capacity = buffers, capacity
        self._bind()

    def _bind(self) -> None:
        """One OrtValue per buffer, sharing its numpy memory: the past input and present output."""
        self._values = [self._ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.buffers]


def cache_for(decoder, spec: Mapping, kv_cache: str | None = None):
    """The cache strategy for ``decoder`` with the manifest's ``decoder`` section ``spec``:
    shared buffers for a ``"shared-buffer"`` decoder on a session with IO binding."""
    layout = kv_cache or spec.get("kv_cache", "concat")
    args = (decoder, spec["past_input_names"], spec["present_output_names"], spec["num_kv_heads"], spec["head_dim"])
    if layout == "shared-buffer" and hasattr(decoder, "run_with_ortvaluevector"):
        return SharedBufferCache(*args, vocab_size=int(spec["vocab_size"]))
    return CopyingCache(*args)
