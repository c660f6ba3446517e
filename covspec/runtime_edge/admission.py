"""Admission on the edge: whether one more session fits, by slots and by KV memory.

An open is admitted while the live sessions fit ``max_sessions`` and ``kv_budget`` (each
session charged ``Session.kv_bytes``: its context plus ``max_new_tokens`` of KV), else
it is answered ``busy``, which devices wait out with backoff. Finished sessions make
room first, the least recently active first: a finished session holds a slot, and a
conversation's (waiting for its next question) its cache too; its device reopens it
with the whole history when it comes back (``expired``). The model thread calls these
and owns the sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from covspec.protocol import errors
from covspec.protocol.errors import EdgeError
from covspec.runtime_edge.config import ServerConfig
from covspec.runtime_edge.session import Session

MIB = 1024 * 1024


def make_room(sessions: Iterable[Session], config: ServerConfig, keep: Session | None,
              end: Callable[[Session, str], None]) -> None:
    """A slot and KV room for one more session beside ``sessions`` (``end``-ing finished ones
    as needed), else ``busy``. ``keep`` is never ended: the session a follow-up continues,
    which the new session replaces."""
    def others() -> list[Session]:
        return [s for s in list(sessions) if s is not keep]

    budget = config.kv_budget
    while True:
        full = len(others()) >= config.max_sessions or \
            (budget is not None and sum(s.kv_bytes() for s in others()) >= budget)
        finished = [s for s in others() if s.done]
        if not (full and finished):
            break
        end(min(finished, key=lambda s: s.last_active), "finished; its room was needed")
    if len(others()) >= config.max_sessions:
        raise EdgeError(errors.BUSY, f"the edge already serves {config.max_sessions} sessions; "
                                     "retry later or ask the operator to raise --max-sessions.")
    check_kv_budget(others(), budget, 0)


def check_kv_budget(sessions: Iterable[Session], budget: int | None, needed: int) -> None:
    """``busy`` unless the live sessions' KV (``Session.kv_bytes``) and ``needed`` more bytes
    fit ``budget`` (None: no bound); a live total already at the budget is refused before any
    prefill."""
    if budget is None:
        return
    live = sum(session.kv_bytes() for session in sessions)
    if live >= budget:
        raise EdgeError(errors.BUSY, f"the live sessions' KV cache already takes {live / MIB:.1f} MiB of this "
                                     f"edge's --kv-budget of {budget / MIB:.1f} MiB; retry later (sessions free "
                                     "theirs as they finish).")
    if live + needed > budget:
        raise EdgeError(errors.BUSY, f"this session's KV cache would take {needed / MIB:.1f} MiB beside the live "
                                     f"sessions' {live / MIB:.1f} MiB, beyond this edge's --kv-budget of "
                                     f"{budget / MIB:.1f} MiB; retry later (sessions free theirs as they "
                                     "finish) or ask for fewer new tokens.")
