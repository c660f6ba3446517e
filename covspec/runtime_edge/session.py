"""One device's session on the edge: committed tokens, KV cache, sampling state, stats.

A ``Session`` owns the state of one generation and runs its rounds against a
``TargetModel``; it never touches a socket (the server sends what it returns).

Positions count generated tokens only. ``committed`` holds every generated token so
far; the KV cache holds the context plus all committed tokens except the last one,
the *pending* token, which opens every forward. A verify round runs
``[pending] + chunk`` (n + 1 inputs -> n + 1 logits rows), decides accepted and the
correction/bonus token (``covspec.protocol.speculative``), applies the stops (EOS,
``max_new_tokens``), commits, and crops the cache so that it again holds everything
except the new last token. Once a session is done its cache is freed.

A verify whose ``start`` is not ``len(committed)``, or whose ``assumed`` token is not
the last committed token, is ``stale``: nothing changes. Validation of a request
happens before any state changes, so a refused request leaves the session intact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from covspec.protocol import speculative as spec
from covspec.protocol.messages import Open, Opened, Result, Verify
from covspec.runtime_edge.errors import BAD_FIELD, BAD_TOKEN, MISSING_FIELD, TOO_LONG, EdgeError
from covspec.runtime_edge.target import Context, TargetModel


@dataclass(frozen=True)
class Decoding:
    """The user's sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def p(self, logits: np.ndarray) -> np.ndarray:
        """Target distribution(s) from logits [..., V] (sampling mode only)."""
        return spec.target_probs(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class SessionStats:
    """Counters for the one log line a session leaves behind."""

    rounds: int = 0            # verify rounds that ran the model (stale ones excluded)
    drafted: int = 0           # draft tokens verified
    accepted: int = 0          # draft tokens accepted
    stale: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    prefill_ms: float = 0.0
    verify_ms: float = 0.0     # model time of all rounds (and target-only steps)

    def line(self, session_id: str, mode: str, tokens: int, reason: str) -> str:
        mean_accepted = self.accepted / self.rounds if self.rounds else 0.0
        mean_verify = self.verify_ms / self.rounds if self.rounds else 0.0
        return (f"session {session_id} {reason}: mode={mode} tokens={tokens} rounds={self.rounds} "
                f"accepted_mean={mean_accepted:.2f} drafted={self.drafted} stale={self.stale} "
                f"bytes_in={self.bytes_in} bytes_out={self.bytes_out} prefill_ms={self.prefill_ms:.1f} "
                f"verify_ms_mean={mean_verify:.2f} verify_ms_total={self.verify_ms:.1f}")


@dataclass
class Session:
    """State of one session; create it with ``Session.open``."""

    id: str
    mode: str
    max_new_tokens: int
    wire: str
    decoding: Decoding
    rng: np.random.Generator
    context_len: int = 0
    committed: list[int] = field(default_factory=list)
    cache: object | None = None
    done: bool = False
    last_seq: int = -1
    last_reply: list[bytes] | None = None
    identity: bytes = b""
    last_active: float = field(default_factory=time.monotonic)
    stats: SessionStats = field(default_factory=SessionStats)

    # --- open --------------------------------------------------------------------

    @classmethod
    def open(cls, target: TargetModel, msg: Open, image, *, max_context: int) -> tuple["Session", Opened]:
        """Prefill a fresh (or reopened) session and commit its next token.

        On a reopen ``msg.committed`` holds every token the device already committed;
        they are prefilled after the context and generation continues after them.
        """
        session = cls(id=msg.session, mode=msg.mode, max_new_tokens=msg.max_new_tokens, wire=msg.wire,
                      decoding=Decoding(msg.temperature, msg.top_k, msg.top_p),
                      rng=np.random.default_rng(msg.seed))
        committed = [int(t) for t in msg.committed]
        _check_tokens(committed, target.vocab_size, "committed")
        if len(committed) > msg.max_new_tokens:
            raise EdgeError(BAD_FIELD, f"committed holds {len(committed)} tokens but max_new_tokens is "
                                       f"{msg.max_new_tokens}; send at most max_new_tokens committed tokens.")
        context: Context = target.context(msg.prompt, image, keep=msg.target_keep)
        if context.length + msg.max_new_tokens > max_context:
            raise EdgeError(TOO_LONG, f"the context is {context.length} tokens and max_new_tokens is "
                                      f"{msg.max_new_tokens}, beyond this edge's max context of {max_context}; "
                                      f"ask for at most {max(0, max_context - context.length)} new tokens.")
        session.context_len = context.length
        session.committed = committed
        if len(committed) >= msg.max_new_tokens or any(t in target.eos_ids for t in committed):
            session.done = True                     # the reopen already ended generation
            return session, session._opened(msg.seq, spec.NO_TOKEN)
        begin = time.perf_counter()
        session.cache, logits = target.prefill(context, committed)   # logits [V]
        token = session._choose(logits)
        session.stats.prefill_ms = (time.perf_counter() - begin) * 1e3
        session.committed.append(token)
        session.done = token in target.eos_ids or len(session.committed) >= msg.max_new_tokens
        if session.done:
            session.free()
        return session, session._opened(msg.seq, token)

    def _opened(self, seq: int, token: int) -> Opened:
        return Opened(session=self.id, seq=seq, token=token, position=len(self.committed) - 1,
                      done=self.done, prefill_ms=self.stats.prefill_ms, context_len=self.context_len)

    # --- one verify round ----------------------------------------------------------

    def verify(self, target: TargetModel, msg: Verify) -> Result:
        """Verify one draft chunk; returns the verdict (``ok``) or ``stale``."""
        # 1. Is the chunk about the committed sequence as it is now?
        if msg.start != len(self.committed) or (msg.assumed != -1 and msg.assumed != self.committed[-1]):
            self.stats.stale += 1
            return Result(session=self.id, seq=msg.seq, start=msg.start, status="stale")
        # 2. Validate it completely before anything changes.
        tokens = np.asarray(msg.tokens, dtype=np.int64)                          # [n]
        _check_tokens(tokens, target.vocab_size, "tokens")
        dense = self.wire == "dense"
        if dense and msg.q_dense is None:
            raise EdgeError(MISSING_FIELD, "this session uses the dense wire, so verify needs q_dense: the "
                                           "draft's full distribution per drafted position.")
        if dense and msg.q_dense.shape[1] > target.vocab_size:
            raise EdgeError(BAD_FIELD, f"q_dense has {msg.q_dense.shape[1]} columns, more than the target "
                                       f"vocabulary ({target.vocab_size}).")
        if not self.decoding.greedy and not dense:
            if msg.q_ids is None:
                raise EdgeError(MISSING_FIELD, "this session samples (temperature > 0), so verify needs "
                                               "q_ids and q_probs: the draft's sparse proposal per position.")
            _check_tokens(msg.q_ids, target.vocab_size, "q_ids")
        if self.done:
            return Result(session=self.id, seq=msg.seq, start=msg.start, accepted=0,
                          token=spec.NO_TOKEN, done=True)
        # 3. Tokens past max_new_tokens can never be committed: drop them.
        remaining = self.max_new_tokens - len(self.committed)
        n = min(len(tokens), remaining)
        tokens = tokens[:n]
        if self.decoding.greedy:
            q = None
        elif dense:
            q = _padded_q(msg.q_dense[:n], tokens, target.vocab_size)
        else:
            q = _dense_q(msg.q_ids[:n], msg.q_probs[:n], tokens, target.vocab_size)
        begin = time.perf_counter()
        # 4. One forward over [pending] + chunk.
        logits = target.extend(self.cache, [self.committed[-1]] + tokens.tolist())  # [n + 1, V]
        # 5. Acceptance rule, then the stops.
        if self.decoding.greedy:
            accepted, token = spec.verify_greedy(tokens, logits)
        else:
            accepted, token = spec.verify_sampling(tokens, q, self.decoding.p(logits), self.rng)
        verdict = spec.apply_stops(tokens, accepted, token, target.eos_ids, remaining)
        # 6. Commit and roll the cache back to everything but the new last token.
        self.committed += verdict.committed(tokens)
        self.done = verdict.done
        if self.done:
            self.free()
        else:
            target.rollback(self.cache, self.context_len + len(self.committed) - 1)
        verify_ms = round((time.perf_counter() - begin) * 1e3, 3)
        self.stats.rounds += 1
        self.stats.drafted += n
        self.stats.accepted += verdict.accepted
        self.stats.verify_ms += verify_ms
        # The dense wire (the conventional baseline) also returns the full target
        # distribution where the correction or bonus was drawn.
        p_dense = None
        if dense and verdict.token != spec.NO_TOKEN:
            row = logits[verdict.accepted]
            p_row = spec.target_probs(row, 1.0) if self.decoding.greedy else self.decoding.p(row)
            p_dense = p_row.astype(np.float16)
        return Result(session=self.id, seq=msg.seq, start=msg.start, accepted=verdict.accepted,
                      token=verdict.token, done=verdict.done, verify_ms=verify_ms, p_dense=p_dense)

    # --- target-only decoding -------------------------------------------------------

    def step(self, target: TargetModel, seq: int) -> Result:
        """Generate one token with the target alone (target_only mode): a round with an empty chunk."""
        assert not self.done, "step on a finished session"
        begin = time.perf_counter()
        logits = target.extend(self.cache, [self.committed[-1]])                 # [1, V]
        token = self._choose(logits[0])
        verdict = spec.apply_stops(np.zeros(0, np.int64), 0, token, target.eos_ids,
                                   self.max_new_tokens - len(self.committed))
        self.committed.append(verdict.token)
        self.done = verdict.done
        if self.done:
            self.free()
        verify_ms = round((time.perf_counter() - begin) * 1e3, 3)
        self.stats.rounds += 1
        self.stats.verify_ms += verify_ms
        return Result(session=self.id, seq=seq, start=len(self.committed) - 1, accepted=0,
                      token=verdict.token, done=verdict.done, verify_ms=verify_ms)

    # --- helpers ----------------------------------------------------------------------

    def _choose(self, logits: np.ndarray) -> int:
        """The next token from one logits row [V]: argmax, or a draw from p."""
        if self.decoding.greedy:
            return int(np.argmax(logits))
        return spec.sample(self.decoding.p(logits), self.rng)

    def free(self) -> None:
        """Drop the KV cache (the session keeps its committed tokens and last reply)."""
        self.cache = None

    def log_line(self, reason: str) -> str:
        return self.stats.line(self.id, self.mode, len(self.committed), reason)


def _check_tokens(tokens, vocab_size: int, name: str) -> None:
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = int(array[(array < 0) | (array >= vocab_size)].flat[0])
        raise EdgeError(BAD_TOKEN, f"{name} holds token id {bad}, outside the target vocabulary "
                                   f"[0, {vocab_size}); check that device and edge use the same tokenizer.")


def _padded_q(q_dense: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The draft's full distributions [n, V_draft] (float16), normalized and padded to [n, V]."""
    weights = np.asarray(q_dense, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or np.any(weights.sum(axis=-1) <= 0):
        raise EdgeError(BAD_FIELD, "q_dense must be finite, non-negative, with positive mass in every row.")
    q = np.zeros((weights.shape[0], vocab_size))
    q[:, : weights.shape[1]] = weights / weights.sum(axis=-1, keepdims=True)
    _check_q_covers(q, tokens)
    return q


def _check_q_covers(q: np.ndarray, tokens: np.ndarray) -> None:
    zero = np.nonzero(q[np.arange(len(tokens)), tokens] <= 0)[0]
    if zero.size:
        i = int(zero[0])
        raise EdgeError(BAD_FIELD, f"draft token {int(tokens[i])} at chunk position {i} has zero probability in "
                                   "its q; the draft must sample from exactly the q it sends.")


def _dense_q(ids: np.ndarray, probs: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The draft's proposals [n, k] as dense distributions [n, V], checked to be usable."""
    weights = np.asarray(probs, dtype=np.float64)                                  # [n, k]
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or np.any(weights.sum(axis=-1) <= 0):
        raise EdgeError(BAD_FIELD, "q_probs must be finite, non-negative, with positive mass in every row.")
    for i, row in enumerate(ids):
        if len(np.unique(row)) != len(row):
            raise EdgeError(BAD_FIELD, f"q_ids row {i} repeats an id; send each proposed id once.")
    q = spec.dense_q(ids, probs, vocab_size)                                        # [n, V]
    _check_q_covers(q, tokens)
    return q
