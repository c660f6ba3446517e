"""A prefill in pieces (``runtime_edge/prefill.py``) gives one prefill's logits and answer.

Per family (the toy; Qwen2-VL's M-RoPE; Gemma 3's sliding windows and bidirectional image
attention; Idefics3's tiles): sessions about same-sized images share one head forward,
their rests run in small chunks inside forwards shared with another session's rounds,
and every session's first-token logits equal its own ``TargetModel.prefill`` up to
float rounding, its greedy answer token for token; so do a reopen's committed tokens
and a start from a given prefix KV (the prefix cache's and a follow-up's case).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_checks import QUESTIONS, noise
from test_prefix_cache import assert_close, family_target, greedy

from covspec.runtime_edge.prefill import Prefill, run_heads
from covspec.runtime_edge.rounds import run_forward

ANSWER_TOKENS = 8


def chunked(target, prefills: list[Prefill], size: int, bystander) -> None:
    """Heads together, then the rests ``size`` tokens at a time, each forward shared with
    a one-token extension of ``bystander`` (another session's cache)."""
    heads = any(p.head for p in prefills)
    assert run_heads(target, prefills, max_batch=8) == heads          # same-sized images: one forward
    while any(p.rest for p in prefills):
        open_ = [p for p in prefills if p.rest]
        target.extend_batch([bystander], [[1]])               # the bystander's own step, alone
        run_forward(target, [], [(p, size) for p in open_])
        target.rollback(bystander, bystander.kv.length - 1)


@pytest.mark.parametrize("family", ["toy", "qwen2vl", "gemma3", "idefics3"])
def test_pieces_give_one_prefills_logits_and_answers(tmp_path, family):
    target = family_target(family, tmp_path / "target")
    images = [noise(57, 40, seed=s) for s in range(3)]
    with torch.inference_mode():
        contexts = [target.context(question, image) for question, image in zip(QUESTIONS, images)]
        fresh = [target.prefill(context) for context in contexts]
        answers = [greedy(target, cache, logits, ANSWER_TOKENS) for cache, logits in fresh]
        bystander, _ = target.prefill(contexts[0])
        committed = answers[2][:3]                               # the third session is a reopen
        prefills = [Prefill.plan(target, context, committed if i == 2 else ()) for i, context in enumerate(contexts)]
        assert all(0 < p.head < p.context.length for p in prefills)
        chunked(target, prefills, 3, bystander)
        for i, (prefill, (_, logits)) in enumerate(zip(prefills, fresh)):
            assert prefill.done
            if i == 2:
                assert_close(prefill.logits, target.prefill(contexts[2], committed)[1])
                assert greedy(target, prefill.cache, prefill.logits, 3) == answers[2][3:6]
            else:
                assert_close(prefill.logits, logits)
                assert greedy(target, prefill.cache, prefill.logits, ANSWER_TOKENS) == answers[i]
        # From a given prefix KV: a copy of the first session's head, the rest in chunks.
        head = target.family.shortest_reused_prefix(contexts[0])
        prefix = target.prefill(contexts[0])[0].kv.copy(head)
        again = Prefill.plan(target, contexts[0], (), prefix=prefix)
        assert again.head == 0 and again.reused == head
        chunked(target, [again], 2, bystander)
        assert_close(again.logits, fresh[0][1])
        assert greedy(target, again.cache, again.logits, ANSWER_TOKENS) == answers[0]


def test_a_short_rest_joins_the_head_but_committed_tokens_never_do():
    from covspec.runtime_edge.target import TargetModel
    from covspec.toy.models import bundled_model_dir

    target = TargetModel.load(bundled_model_dir("target"))
    with torch.inference_mode():
        context = target.context(QUESTIONS[0], noise(40, 40, seed=6))
        floor = target.family.shortest_reused_prefix(context)
        short = Prefill.plan(target, context, [7, 8], chunk=context.length - floor)
        assert (short.head, short.rest) == (context.length, [7, 8])
        cut = Prefill.plan(target, context, [7, 8], chunk=context.length - floor - 1)
        assert cut.head == floor and cut.rest[-2:] == [7, 8]


def test_a_pruned_context_prefills_whole_in_its_head():
    from covspec.runtime_edge.target import TargetModel
    from covspec.toy.models import bundled_model_dir

    target = TargetModel.load(bundled_model_dir("target"))
    image = noise(40, 40, seed=5)
    with torch.inference_mode():
        pruned = target.context(QUESTIONS[0], image, keep=[0, 3, 7])
        prefill = Prefill.plan(target, pruned, [])
        assert prefill.head == pruned.length and not prefill.rest
        assert run_heads(target, [prefill], 8) == 1 and prefill.done
        np.testing.assert_allclose(prefill.logits, target.prefill(pruned)[1], rtol=1e-5, atol=1e-5)
