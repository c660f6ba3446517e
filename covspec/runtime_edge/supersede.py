"""Which waiting verify chunks a newer chunk of the same session supersedes.

A device whose draft runs ahead of a greedy edge-led session (``runtime_device/edge_led.py``)
sends its continuation again and again from its committed end, so the newest chunk of
the session holds the older ones' tokens and more. ``split_superseded`` picks, among the
requests waiting for an iteration, the chunks that wait behind a newer chunk of the same
session from the same device: the model thread answers them ``stale`` unrun and verifies
the newest alone, in one forward instead of one each. Greedy only: which chunk is
verified then never changes the output. A chunk that hands the lead over
(``device_leads``), one of a sampling or speculative session, one already answered (a
resend) or one that does not pass the owner check is left to the usual handling.
Nothing here replies or runs a model.
"""

from __future__ import annotations

from covspec.protocol.errors import EdgeError
from covspec.protocol.messages import Verify


def split_superseded(waiting: list, sessions: dict) -> tuple[list, list]:
    """(the requests to handle as usual, [(request, session)] superseded), in order;
    ``waiting`` holds the model thread's requests (``identity``, ``message``, ``peer_key``),
    ``sessions`` its sessions by id."""
    newest = {r.message.session: (r.identity, r.message.seq) for r in waiting if isinstance(r.message, Verify)}
    kept, superseded = [], []
    for request in waiting:
        message = request.message
        session = sessions.get(message.session) if isinstance(message, Verify) else None
        if (session is not None and session.mode == "edge_led" and session.sampling.greedy
                and not message.device_leads and message.seq > session.last_seq
                and newest[message.session][0] == request.identity
                and newest[message.session] != (request.identity, message.seq) and _owned(session, request)):
            superseded.append((request, session))
        else:
            kept.append(request)
    return kept, superseded


def _owned(session, request) -> bool:
    try:
        session.check_owner(request.message, request.peer_key)
    except EdgeError:
        return False
    return True
