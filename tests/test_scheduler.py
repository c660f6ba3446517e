"""The edge's scheduler on fake sessions, without a model (``runtime_edge/scheduler.py``):
budgets, arrival order, fairness, no starvation, prefill pieces beside the rounds.

A small simulation drives ``schedule`` the way the model thread does (a plan per
iteration; rounds, steps and prefill pieces take effect; the starved flag) and checks
properties over many iterations."""

from __future__ import annotations

from covspec.runtime_edge.scheduler import CLOSE, OPEN, VERIFY, Budget, Prefilling, Streaming, Waiting, schedule


def test_rounds_fill_the_forward_first_and_prefill_takes_the_room_left():
    waiting = [Waiting(f"v{i}", VERIFY, 9) for i in range(3)]
    prefilling = [Prefilling("p0", head=0, rest=100), Prefilling("p1", head=0, rest=5)]
    budget = Budget(max_batch=8, max_tokens=60, prefill_chunk=32, prefill_tokens=512)
    plan = schedule(waiting, prefilling, [], budget)
    assert plan.handle == [0, 1, 2]
    assert plan.chunks == [("p0", 9), ("p1", 5)]              # no wider than the widest round
    wide = [Waiting(f"v{i}", VERIFY, 20) for i in range(3)]
    assert schedule(wide[:2], prefilling, [], budget).chunks == [("p0", 20)]    # 40 + 20 = 60: the budget
    assert schedule([], prefilling, [], budget).chunks == [("p0", 32), ("p1", 5)]   # no round: full chunks


def test_the_forward_never_passes_max_batch_or_max_tokens():
    waiting = [Waiting(f"v{i}", VERIFY, 9) for i in range(10)]
    plan = schedule(waiting, [Prefilling("p", 0, 50)], [Streaming("t", "target_only")],
                    Budget(max_batch=4, max_tokens=1000))
    assert plan.handle == [0, 1, 2, 3] and not plan.steps and not plan.chunks
    plan = schedule(waiting, [], [], Budget(max_batch=64, max_tokens=30))
    assert plan.handle == [0, 1, 2]                           # 27 tokens; a fourth round would pass 30


def test_a_first_round_larger_than_the_token_budget_still_runs():
    plan = schedule([Waiting("v", VERIFY, 100)], [], [], Budget(max_tokens=10))
    assert plan.handle == [0]


def test_requests_keep_arrival_order_within_a_session():
    waiting = [Waiting("a", VERIFY, 9), Waiting("b", VERIFY, 9), Waiting("a", VERIFY, 9), Waiting("a", CLOSE),
               Waiting("c", OPEN), Waiting("c", VERIFY, 2), Waiting("d", CLOSE)]
    plan = schedule(waiting, [], [], Budget())
    assert plan.handle == [0, 1, 4, 6]                        # a's second verify and close wait; so does c's verify


def test_a_prefilling_sessions_requests_wait_for_its_open():
    waiting = [Waiting("p", OPEN), Waiting("p", CLOSE), Waiting("q", CLOSE)]
    plan = schedule(waiting, [Prefilling("p", 0, 4)], [], Budget())
    assert plan.handle == [2] and plan.chunks == [("p", 4)]


def test_opens_are_admitted_while_fewer_than_max_batch_sessions_prefill():
    waiting = [Waiting(f"o{i}", OPEN) for i in range(5)]
    plan = schedule(waiting, [Prefilling("p", 100, 0)], [], Budget(max_batch=3))
    assert plan.handle == [0, 1]


def test_heads_run_whole_up_to_the_prefill_budget_and_the_first_always():
    prefilling = [Prefilling(f"p{i}", head=150, rest=20) for i in range(4)]
    plan = schedule([], prefilling, [], Budget(prefill_tokens=400, prefill_chunk=32))
    assert plan.heads == ["p0", "p1"]                         # 150 + 20 + 150 + 20 = 340; a third head passes 400
    assert plan.chunks == [("p0", 20), ("p1", 20)]            # a head and its first chunk in one iteration
    plan = schedule([], [Prefilling("huge", head=5000, rest=0)], [], Budget(prefill_tokens=400))
    assert plan.heads == ["huge"]


def test_edge_steps_follow_the_rule():
    streaming = [Streaming("t", "target_only"), Streaming("e", "edge_led")]
    assert schedule([], [], streaming, Budget()).steps == ["t", "e"]
    busy = [Waiting(f"v{i}", VERIFY, 9) for i in range(3)]
    assert schedule(busy, [], streaming, Budget(max_batch=4)).steps == ["t"]          # auto: half the batch full
    assert schedule(busy, [], streaming, Budget(max_batch=4, edge_steps="always")).steps == ["t"]  # no room
    assert schedule(busy, [], streaming, Budget(max_batch=8, edge_steps="never")).steps == ["t"]
    assert schedule([Waiting("e", VERIFY, 9)], [], streaming, Budget()).steps == ["t"]  # e has its round


class World:
    """Fake sessions served by plans: ``decoders`` always have a verify waiting (arrival
    order kept), ``opens`` arrive over time and prefill as planned."""

    def __init__(self, budget: Budget, decoders: int, head: int, rest: int):
        self.budget, self.head, self.rest = budget, head, rest
        self.waiting = [Waiting(f"d{i}", VERIFY, 9) for i in range(decoders)]
        self.prefilling: list[list] = []           # [session, head, rest]
        self.starved: str | None = None
        self.rounds: dict[str, list[int]] = {f"d{i}": [] for i in range(decoders)}
        self.opened: dict[str, tuple[int, int]] = {}          # session: (arrived, opened) iterations
        self.arrived: dict[str, int] = {}
        self.forwards: list[tuple[int, int, int]] = []        # (sessions, tokens, prefill tokens) per forward

    def arrive(self, name: str, now: int) -> None:
        self.waiting.append(Waiting(name, OPEN))
        self.arrived[name] = now

    def iterate(self, now: int) -> None:
        oldest = self.prefilling[0][0] if self.prefilling else None
        plan = schedule(self.waiting, [Prefilling(s, h, r, skipped=s == self.starved) for s, h, r in self.prefilling],
                        [], self.budget)
        handled = [self.waiting[i] for i in plan.handle]
        self.waiting = [w for i, w in enumerate(self.waiting) if i not in set(plan.handle)]
        tokens = sessions = 0
        for request in handled:
            if request.kind == OPEN:
                self.prefilling.append([request.session, self.head, self.rest])
            else:
                self.rounds[request.session].append(now)
                self.waiting.append(Waiting(request.session, VERIFY, 9))      # its next round
                tokens, sessions = tokens + 9, sessions + 1
        by_name = {p[0]: p for p in self.prefilling}
        for name in plan.heads:
            by_name[name][1] = 0
        prefill = 0
        for name, count in plan.chunks:
            assert by_name[name][1] == 0 and 0 < count <= min(by_name[name][2], self.budget.prefill_chunk)
            by_name[name][2] -= count
            tokens, sessions, prefill = tokens + count, sessions + 1, prefill + count
        self.forwards.append((sessions, tokens, prefill))
        for name, head, rest in list(self.prefilling):
            if not head and not rest:
                self.prefilling.remove(by_name[name])
                self.opened[name] = (self.arrived[name], now)
        self.starved = oldest if oldest is not None and oldest not in plan.prefill_sessions else None


def test_no_starvation_rounds_keep_going_and_prefills_finish_under_full_load():
    """16 decoders keep the forward full (max_batch 16); opens with long prompts keep
    arriving. Each advances every other iteration (its due piece goes first), so every
    open finishes; every decoder gets a round at least every other iteration; no forward
    passes its budgets by more than the one due piece."""
    budget = Budget(max_batch=16, max_tokens=160, prefill_chunk=16, prefill_tokens=64)
    world = World(budget, decoders=16, head=40, rest=50)
    for now in range(300):
        if now % 12 == 0 and now < 240:
            world.arrive(f"o{now}", now)
        world.iterate(now)
    assert len(world.opened) == 20
    # a head and ceil(50 / 9) chunks (no wider than the 9-token rounds), one at least every other iteration
    assert max(done - arrived for arrived, done in world.opened.values()) <= 1 + 2 * (1 + 6)
    for name, at in world.rounds.items():
        assert len(at) > 140 and max(b - a for a, b in zip(at, at[1:])) <= 2, name
    assert all(sessions <= 16 and tokens <= 160 + 16 for sessions, tokens, _ in world.forwards)   # a due chunk has its seat
    assert all(prefill <= budget.prefill_chunk + 64 for _, _, prefill in world.forwards)


def test_unbatched_rounds_and_prefill_chunks_take_turns():
    """``max_batch`` 1: every forward holds one session; a prefill is never starved."""
    world = World(Budget(max_batch=1, prefill_chunk=8), decoders=2, head=0, rest=40)
    world.arrive("o", 0)
    for now in range(40):
        world.iterate(now)
    assert all(sessions <= 1 for sessions, _, _ in world.forwards)
    assert "o" in world.opened and sum(len(at) for at in world.rounds.values()) >= 25


def test_prefill_chunks_interleave_with_rounds():
    """A long prompt never holds the rounds back: while it prefills, every decoder gets
    a round in every iteration, beside one chunk of the prompt."""
    world = World(Budget(max_batch=8, prefill_chunk=16, prefill_tokens=16), decoders=4, head=0, rest=90)
    world.arrive("long", 0)
    for now in range(12):
        world.iterate(now)
    assert world.opened["long"] == (0, 10)          # admitted at 0, ten chunks of 9 (the rounds' width) from 1 to 10
    assert all(at == list(range(12)) for at in world.rounds.values())
    assert all(sessions == 5 and prefill == 9 for sessions, _, prefill in world.forwards[1:11])
