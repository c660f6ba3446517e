"""One device's session on the edge: committed tokens, KV cache, sampling state, stats.

A ``Session`` owns the state of one generation and runs its rounds against a
``TargetModel``; it never touches a socket (the server sends what it returns).

``Session.open`` builds the target's context (the family's), prefills it (with every
token a reopen carries; through the edge's ``PrefixCache`` when it has one, which may
start the cache from a cached prefix) and chooses the next token, the reply ``opened``.
The model thread splits it: ``begin`` builds the context and plans the prefill
(``session.prefill``, a ``prefill.Prefill`` its scheduler runs in pieces beside other
sessions' rounds), ``opened`` chooses the token once the last piece ran.
``kv_bytes()`` is what the session's KV cache may take (the edge's ``--kv-budget``).

Positions count generated tokens only. ``committed`` holds every generated token so
far; the KV cache holds the context plus all committed tokens except the last one,
the *pending* token, which opens every forward. A round is three steps, so that the
model thread can run the middle one for many sessions at once:

1. ``prepare(target, verify)``: is the chunk about the committed sequence as it is
   now (``_overtaken``: else ``stale``; an ``edge_led`` chunk may start before the
   committed end if its covered tokens equal the committed ones)? Validate it
   completely (token ids; the wire codec decodes the draft's q) before anything
   changes, drop tokens past ``max_new_tokens``, and return a ``Round``: the forward's
   inputs ``[pending] + chunk`` and, when sampling, the uniforms its verdict will use,
   drawn here from the session's seeded generator. ``prepare_step`` is a target step:
   the same round with an empty chunk;
2. the forward and the verdict are not here: ``rounds.run_rounds`` runs the rounds of
   many sessions as one target forward and judges each chunk (``verify_batch``);
3. ``commit(target, round, accepted, token, row)``: apply the stops (EOS,
   ``max_new_tokens``; ``verification.apply_stops``) to the verdict, commit, roll the
   cache back so that it again holds everything except the new last token, and build
   the ``result`` (with what the wire format adds, from the logits ``row``).

Once a session is done its cache is freed, unless it is a conversation's (``conversation``):
then it keeps the context and every committed token but the last, for the next turn
(``turns.py``). A refused request leaves the session intact.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from covspec.protocol import verification as spec
from covspec.protocol.errors import BAD_FIELD, NOT_OWNER, TOO_LONG, EdgeError
from covspec.protocol.messages import Open, Opened, Result, Verify
from covspec.protocol.sampling import SamplingParams
from covspec.protocol.wire import Codec, check_tokens, codec_named
from covspec.runtime_edge.prefill import Prefill
from covspec.runtime_edge.prefix_cache import PrefixCache
from covspec.runtime_edge.target import Context, TargetCache, TargetModel
from covspec.runtime_edge.turns import continue_from, continued_prefix, conversation_template


@dataclass
class Round:
    """One validated round, ready for the target forward.

    ``tokens`` [n] are the draft tokens to judge (n may be 0: a target-only step), ``q``
    [n, V] the draft's distributions (None when greedy), ``inputs`` the forward's input
    ids (``[pending] + tokens``), ``remaining`` how many tokens may still be committed.
    A sampling round carries its uniforms: ``accept_uniforms`` [n] for the acceptance
    tests and ``sample_uniform`` for the one correction/bonus draw (None when greedy).
    """

    seq: int
    start: int
    tokens: np.ndarray
    q: np.ndarray | None
    inputs: list[int]
    remaining: int
    accept_uniforms: np.ndarray | None = None
    sample_uniform: float | None = None
    began: float = field(default_factory=time.perf_counter)


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
    reused: int = 0            # context tokens taken from the prefix cache instead of prefilled
    continued: int = 0         # context tokens kept from the session's previous turn (a conversation)
    verify_ms: float = 0.0     # model time of all rounds (and target-only steps)

    def line(self, session_id: str, mode: str, tokens: int, reason: str) -> str:
        mean_accepted = self.accepted / self.rounds if self.rounds else 0.0
        mean_verify = self.verify_ms / self.rounds if self.rounds else 0.0
        return (f"session {session_id} {reason}: mode={mode} tokens={tokens} rounds={self.rounds} "
                f"accepted_mean={mean_accepted:.2f} drafted={self.drafted} stale={self.stale} "
                f"bytes_in={self.bytes_in} bytes_out={self.bytes_out} prefill_ms={self.prefill_ms:.1f} reused={self.reused} continued={self.continued} "
                f"verify_ms_mean={mean_verify:.2f} verify_ms_total={self.verify_ms:.1f}")


@dataclass
class Session:
    """State of one session; create it with ``Session.open``."""

    id: str
    mode: str                         # speculative, target_only or edge_led
    max_new_tokens: int
    codec: Codec                      # the session's wire format
    sampling: SamplingParams
    rng: np.random.Generator
    owner: str = ""                   # the secret every message of the session must carry (96 random bits)
    peer_key: str = ""                # the owner's CurveZMQ public key ("" without keys)
    context_len: int = 0
    committed: list[int] = field(default_factory=list)
    cache: TargetCache | None = None
    done: bool = False
    version: int = 2                  # the protocol version the device speaks (replies use it)
    last_seq: int = -1
    last_reply: list[bytes] | None = None
    identity: bytes = b""
    last_active: float = field(default_factory=time.monotonic)
    stats: SessionStats = field(default_factory=SessionStats)
    conversation: bool = False        # keeps its cache once done, for a follow-up turn (``turns.py``)
    image: bytes = b""                # the image's bytes: a follow-up without them asks about this one
    picture: object = None            # the image decoded (PIL), kept for the follow-ups (``turns.turn_image``)
    context_ids: list[int] = field(default_factory=list)   # a conversation's context ids (none when pruned)
    prefill: Prefill | None = None    # the prefill under way (``begin`` -> ``opened``), else None
    began: float = 0.0                # when the prefill began (perf_counter)

    # --- open --------------------------------------------------------------------

    @classmethod
    def open(cls, target: TargetModel, msg: Open, image, *, max_context: int, owner: str = "",
             peer_key: str = "", prefix_cache: PrefixCache | None = None, image_bytes: bytes = b"",
             previous: "Session | None" = None) -> tuple["Session", Opened]:
        """Prefill a fresh (or reopened) session and commit its next token.

        On a reopen ``msg.committed`` holds every token the device already committed;
        they are prefilled after the context and generation continues after them. With
        ``prefix_cache`` the prefill may start from a cached prefix (``prefix_cache.py``).
        A follow-up turn (``msg.history``) renders the whole conversation and starts from
        ``previous``'s cache (the session's last turn, ``turns.continue_from``) where it can.
        The whole prefill runs here, at once (``begin`` leaves it to a scheduler).
        """
        session, context, opened = cls._new(target, msg, image, max_context, owner, peer_key, image_bytes)
        if opened is not None:
            return session, opened
        continued = continue_from(target, previous, context, session.image, session.committed)
        if continued is not None:
            cache, logits, session.stats.continued = continued
        elif prefix_cache is None:
            cache, logits = target.prefill(context, session.committed)            # logits [V]
        else:
            cache, logits, session.stats.reused = prefix_cache.prefill(target, context, session.image,
                                                                       session.committed)
        return session, session._first(target, cache, logits, msg.seq)

    @classmethod
    def begin(cls, target: TargetModel, msg: Open, image, *, max_context: int, owner: str = "",
              peer_key: str = "", prefix_cache: PrefixCache | None = None, chunk: int = 0,
              image_bytes: bytes = b"", previous: "Session | None" = None) -> tuple["Session", Opened | None]:
        """``open`` up to the prefill: validate, build the context and plan its prefill
        (``session.prefill``, a ``Prefill`` of chunks of ``chunk`` tokens, after ``previous``'s
        rolled-back KV on a follow-up turn; run it in pieces, then ``opened``) -> (session,
        None); or (session, the reply) when nothing is to prefill (a reopen that already ended)."""
        session, context, opened = cls._new(target, msg, image, max_context, owner, peer_key, image_bytes)
        if opened is None:
            prefix = continued_prefix(target, previous, context, session.image)
            session.prefill = Prefill.plan(target, context, session.committed, prefix_cache=prefix_cache,
                                           image=session.image, prefix=prefix, limit=session.max_positions,
                                           chunk=chunk)
            if prefix is not None:
                session.stats.continued = prefix.length
            else:
                session.stats.reused = session.prefill.reused
        return session, opened

    def opened(self, target: TargetModel, seq: int) -> Opened:
        """The prefill ``begin`` planned has run: commit the next token; the reply ``opened``."""
        prefill, self.prefill = self.prefill, None
        assert prefill is not None and prefill.done, "opened before the prefill ran"
        return self._first(target, prefill.cache, prefill.logits, seq)

    @classmethod
    def _new(cls, target: TargetModel, msg: Open, image, max_context: int, owner: str, peer_key: str,
             image_bytes: bytes) -> tuple["Session", Context, Opened | None]:
        """A session for ``msg`` and its context, checked; the reply already when a reopen ended."""
        session = cls(id=msg.session, mode=msg.mode, max_new_tokens=msg.max_new_tokens,
                      codec=codec_named(msg.wire), sampling=msg.sampling, rng=np.random.default_rng(msg.seed),
                      owner=owner, peer_key=peer_key, version=msg.version, conversation=msg.conversation,
                      image=image_bytes or msg.image.tobytes(), picture=image, began=time.perf_counter())
        committed = [int(t) for t in msg.committed]
        check_tokens(committed, target.vocab_size, "committed")
        if len(committed) > msg.max_new_tokens:
            raise EdgeError(BAD_FIELD, f"committed holds {len(committed)} tokens but max_new_tokens is "
                                       f"{msg.max_new_tokens}; send at most max_new_tokens committed tokens.")
        context: Context = target.context(msg.prompt, image, keep=msg.target_keep,
                                          template=conversation_template(target, msg))
        if context.length + msg.max_new_tokens > max_context:
            raise EdgeError(TOO_LONG, f"the context is {context.length} tokens and max_new_tokens is "
                                      f"{msg.max_new_tokens}, beyond this edge's max context of {max_context}; "
                                      f"ask for at most {max(0, max_context - context.length)} new tokens.")
        session.context_len = context.length
        if msg.conversation and context.keep is None:          # what a follow-up compares its prompt with
            session.context_ids = [int(i) for i in context.inputs["input_ids"][0].tolist()]
        session.committed = committed
        if len(committed) >= msg.max_new_tokens or any(t in target.eos_ids for t in committed):
            session.done = True                     # the reopen already ended generation
            return session, context, session._opened(msg.seq, spec.NO_TOKEN)
        return session, context, None

    def _first(self, target: TargetModel, cache: TargetCache, logits: np.ndarray, seq: int) -> Opened:
        """The prefill left ``cache`` and ``logits`` [V]: commit the next token; the reply ``opened``."""
        self.cache = cache
        target.bound(cache, self.max_positions)                          # what kv_bytes charges it
        token = self._choose(logits)
        self.stats.prefill_ms = (time.perf_counter() - self.began) * 1e3
        self.committed.append(token)
        self.done = token in target.eos_ids or len(self.committed) >= self.max_new_tokens
        self._settle(target)
        return self._opened(seq, token)

    def _opened(self, seq: int, token: int) -> Opened:
        return Opened(session=self.id, seq=seq, owner=self.owner, token=token, position=len(self.committed) - 1,
                      done=self.done, prefill_ms=self.stats.prefill_ms, context_len=self.context_len)

    # --- one round: prepare -> forward -> commit ---------------------------------------------

    def prepare(self, target: TargetModel, msg: Verify) -> Round | Result:
        """Validate a verify chunk; a ``Round`` to run, or the reply when there is none
        to run (``stale``, or the session already ended)."""
        tokens = np.asarray(msg.tokens, dtype=np.int64)                          # [n]
        skip = self._overtaken(msg, tokens)
        if skip is None:
            self.stats.stale += 1
            return Result(session=self.id, seq=msg.seq, start=msg.start, status="stale")
        check_tokens(tokens, target.vocab_size, "tokens")
        q = self.codec.decode(msg, tokens, target.vocab_size, self.sampling.greedy)   # [n, V]
        if self.done:
            return Result(session=self.id, seq=msg.seq, start=msg.start, accepted=0,
                          token=spec.NO_TOKEN, done=True)
        remaining = self.max_new_tokens - len(self.committed)
        n = min(len(tokens) - skip, remaining)      # tokens past max_new_tokens can never be committed
        return self._round(msg.seq, tokens[skip:skip + n], None if q is None else q[skip:skip + n])

    def _overtaken(self, msg: Verify, tokens: np.ndarray) -> int | None:
        """How many of the chunk's tokens the committed sequence already covers (they are
        skipped), or None when the chunk is ``stale``: it does not start right after the
        committed sequence, or its assumed token is not the committed one. An ``edge_led``
        session's chunk may start earlier, when the target stepped meanwhile, as long as
        every covered token equals the committed one and one token is left to verify:
        a decision on the tokens before the verified position only (see PROTOCOL.md)."""
        skip = len(self.committed) - msg.start
        if skip < 0 or (skip > 0 and self.mode != "edge_led") or skip >= len(tokens):
            return None
        if msg.assumed != -1 and (msg.start == 0 or self.committed[msg.start - 1] != msg.assumed):
            return None
        if skip and tokens[:skip].tolist() != self.committed[msg.start:]:
            return None
        return skip

    def prepare_step(self, seq: int) -> Round:
        """A target-only step: a round with an empty chunk (the target chooses the next token)."""
        assert not self.done, "step on a finished session"
        return self._round(seq, np.zeros(0, np.int64), None)

    def _round(self, seq: int, tokens: np.ndarray, q: np.ndarray | None) -> Round:
        round_ = Round(seq=seq, start=len(self.committed), tokens=tokens, q=q,
                       inputs=[self.committed[-1]] + tokens.tolist(),
                       remaining=self.max_new_tokens - len(self.committed))
        if not self.sampling.greedy:
            round_.accept_uniforms = self.rng.random(len(tokens))
            round_.sample_uniform = float(self.rng.random())
        return round_

    def commit(self, target: TargetModel, work: Round, accepted: int, token: int,
               row: Callable[[int], np.ndarray]) -> Result:
        """Commit the verdict (``accepted`` draft tokens, then ``token``: the correction or
        the bonus) after the stops, and reply. ``row(i)`` gives the logits [V] after chunk
        position i, asked for only when the wire format sends the target's distribution."""
        tokens = work.tokens
        verdict = spec.apply_stops(tokens, accepted, token, target.eos_ids, work.remaining)
        self.committed += verdict.committed(tokens)
        self.done = verdict.done
        self._settle(target)
        verify_ms = round_ms(work.began)
        self.stats.rounds += 1
        self.stats.drafted += len(tokens)
        self.stats.accepted += verdict.accepted
        self.stats.verify_ms += verify_ms
        extra = {}
        if verdict.token != spec.NO_TOKEN:          # what the wire format adds where the token was drawn
            extra = self.codec.verdict_fields(lambda: self._p(row(verdict.accepted)))
        return Result(session=self.id, seq=work.seq, start=work.start, accepted=verdict.accepted,
                      token=verdict.token, done=verdict.done, verify_ms=verify_ms, **extra)

    # --- helpers ----------------------------------------------------------------------------

    def _settle(self, target: TargetModel) -> None:
        """After a commit: roll the cache back to everything but the last committed token; once
        done, free it, unless a follow-up turn may continue it (``conversation``)."""
        if self.done and not self.conversation:
            self.free()
        elif self.cache is not None:
            target.rollback(self.cache, self.context_len + len(self.committed) - 1)

    def _choose(self, logits: np.ndarray) -> int:
        """The next token from one logits row [V]: argmax, or a draw from p."""
        if self.sampling.greedy:
            return int(np.argmax(logits))
        return spec.sample(self.sampling.p(logits), self.rng)

    def _p(self, row: np.ndarray) -> np.ndarray:
        """The target distribution of one logits row [V] (plain softmax when greedy)."""
        return spec.target_probs(row, 1.0) if self.sampling.greedy else self.sampling.p(row)

    @property
    def max_positions(self) -> int:
        """The most positions its KV cache can need: the context, ``max_new_tokens`` (a chunk's
        tokens past them are dropped) and the one verified beside them."""
        return self.context_len + self.max_new_tokens + 1

    def kv_bytes(self) -> int:
        """What the session's KV cache may take: its buffers' bytes per position times the most
        positions it can need (``max_positions``: its growth stops there), or its buffers' bytes
        now if more; 0 once freed."""
        cache = self.cache if self.prefill is None else self.prefill.cache
        if cache is None:
            return 0
        kv = cache.kv
        return max(kv.nbytes, kv.nbytes * self.max_positions // kv.capacity)

    def owned_by(self, message, peer_key: str) -> bool:
        """Whether ``message`` (about this session) comes from the device that opened it: the
        owner secret matches (compared in constant time) and so does the CurveZMQ key when
        keys are on. Never raises (``decode`` guarantees an owner UTF-8 can encode)."""
        owner = getattr(message, "owner", "")
        return hmac.compare_digest(self.owner.encode(), owner.encode()) and self.peer_key == peer_key

    def check_owner(self, message, peer_key: str) -> None:
        """Refuse a message about this session from anyone but the device that opened it
        (``owned_by``). Nothing about the session changes before this passes."""
        if not self.owned_by(message, peer_key):
            raise EdgeError(NOT_OWNER, f"session {message.session!r} belongs to another device; send the owner "
                                       "secret of the session (the one it was opened with, or that this edge "
                                       "issued in `opened`), or open a session of your own.")

    def free(self) -> None:
        """Drop the KV cache and the decoded image (the session keeps its committed tokens and
        last reply)."""
        self.cache = self.prefill = self.picture = None

    def log_line(self, reason: str) -> str:
        return self.stats.line(self.id, self.mode, len(self.committed), reason)


def round_ms(began: float) -> float:
    """Milliseconds since ``began`` (``time.perf_counter``), rounded to microseconds."""
    return round((time.perf_counter() - began) * 1e3, 3)
