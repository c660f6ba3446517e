"""Conversations: follow-up questions about one image on one session (PROTOCOL.md, "Conversations").

- the chat template's pieces (``families/chat.py``) render every family's conversations as
  its own ``apply_chat_template`` does, texts with braces, slots and spaces included, and a
  template that does not compose has none;
- the ``history`` arrays on the wire: round trip, and every malformed form refused;
- on the toy pair, live: three-turn conversations, device-led, edge-led and with the
  hand-over, give the target's own greedy answer to the whole conversation each turn, the
  follow-ups travel without the image and continue the edge's cache;
- an edge that forgot the conversation (idle, evicted for another device, restarted) is
  answered ``expired``, and the device reopens it with the image and the history, exactly;
- `covspec device run` with several --prompt, and `covspec device chat` through a
  pseudo-terminal.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare

from covspec.families import family_for_folder
from covspec.families.chat import ChatTurns, chat_turns
from covspec.families.common import fill_prompt
from covspec.hf.tiny import save_tiny_llava
from covspec.hf.tiny_gemma3 import save_tiny_gemma3
from covspec.hf.tiny_idefics3 import save_tiny_idefics3
from covspec.hf.tiny_onevision import save_tiny_onevision
from covspec.hf.tiny_qwen2vl import save_tiny_qwen2vl
from covspec.protocol import errors
from covspec.protocol.frames import ProtocolError
from covspec.protocol.history import arrays
from covspec.protocol.messages import Open, Ping, Pong, decode, encode
from covspec.protocol.ownership import new_owner, session_id_for
from covspec.protocol.verification import target_probs
from covspec.runtime_device.artifact import DraftArtifact
from covspec.runtime_device.client import Backoff, EdgeClient
from covspec.runtime_device.conversation import Conversation
from covspec.runtime_device.engine import CoInference
from covspec.runtime_device.options import DraftingOptions, GenerationSettings
from covspec.runtime_device.stats import GenerationStats
from covspec.runtime_edge import EdgeServer, ServerConfig
from covspec.bench.harness.workload import toy_questions
from covspec.toy.models import bundled_model_dir

SAVERS = {"llava": save_tiny_llava, "onevision": save_tiny_onevision, "idefics3": save_tiny_idefics3,
          "qwen2vl": save_tiny_qwen2vl, "gemma3": save_tiny_gemma3}
HISTORY = [("  what is {question} in it ?\n", " a {answer} red circle  "), ("is it { big } ?", "\tyes, it is.")]
QUESTIONS = ["what is in the picture ?", "what color is the square ?", "describe the picture ."]
LEADS = ["device", "edge", "auto"]
MAX_NEW = 24


def messages(history, question):
    """The chat messages of a conversation, texts stripped as covspec sends them."""
    first = history[0][0] if history else question
    out = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first.strip()}]}]
    for number, (_, answer) in enumerate(history):
        following = history[number + 1][0] if number + 1 < len(history) else question
        out += [{"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
                {"role": "user", "content": [{"type": "text", "text": following.strip()}]}]
    return out


@pytest.mark.parametrize("name", sorted(SAVERS))
def test_every_family_renders_a_conversation_as_its_own_chat_template(name, tmp_path):
    folder = SAVERS[name](tmp_path / name)
    model, processor = family_for_folder(folder).load(folder)
    turns = chat_turns(processor)
    assert turns is not None and turns.head + turns.tail == fill_prompt(turns.head + turns.tail, "{question}")
    for history in ([], HISTORY[:1], HISTORY):
        expected = processor.apply_chat_template(messages(history, " how old is it ? "), add_generation_prompt=True,
                                                 tokenize=False)
        assert fill_prompt(turns.template(history), " how old is it ? ") == expected, history


def test_a_template_whose_turns_do_not_compose_has_none():
    class Numbered:
        image_token = "<image>"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            users = [m for m in messages if m["role"] == "user"]
            return "".join(f"[{n}] <image>{m['content'][-1]['text']}" if n == 0 else f"[{n}] {m['content'][-1]['text']}"
                           for n, m in enumerate(users)) + " A:"

    assert chat_turns(Numbered()) is None
    assert ChatTurns.from_dict(None) is None
    assert ChatTurns.from_dict({"head": "<image>{question}", "turn": " {question}", "tail": " A:"}).tail == " A:"


# -- the wire -----------------------------------------------------------------------------------

def follow_up(**fields) -> Open:
    owner = new_owner()
    return Open(session=session_id_for(owner), seq=2, owner=owner, prompt="and now ?",
                **{"image": np.zeros(0, np.uint8), "conversation": True, "committed": np.zeros(0, np.int32),
                   **fields})


def test_history_travels_as_arrays_and_round_trips():
    message = follow_up(**arrays(HISTORY))
    decoded = decode(encode(message))
    assert decoded.turns == HISTORY and decoded.conversation and decoded.image.size == 0
    first = Open(session=message.session, seq=1, owner=message.owner, image=np.ones(3, np.uint8),
                 committed=np.zeros(0, np.int32))
    assert b"history" not in encode(first)[0] and b"conversation" not in encode(first)[0]


@pytest.mark.parametrize("case", ["odd", "sum", "negative", "utf8", "alone", "no image", "v3"])
def test_malformed_history_is_refused(case):
    history, sizes = np.frombuffer(b"abcd", np.uint8), np.asarray([2, 2], np.int32)
    fields = {"odd": dict(history=history, history_sizes=np.asarray([4], np.int32)),
              "sum": dict(history=history, history_sizes=np.asarray([1, 2], np.int32)),
              "negative": dict(history=history, history_sizes=np.asarray([5, -1], np.int32)),
              "utf8": dict(history=np.frombuffer(b"\xff\xfe\x00a", np.uint8), history_sizes=sizes),
              "alone": dict(history=history), "no image": {}, "v3": dict(history=history, history_sizes=sizes)}[case]
    if case == "v3":
        frames = encode(follow_up(image=np.ones(2, np.uint8), **fields))
        header = json.loads(frames[0])
        header["v"] = 3
        header.pop("conversation")
        with pytest.raises(ProtocolError) as info:
            decode([json.dumps(header).encode()] + frames[1:])
        assert info.value.code == errors.BAD_ARRAY
        return
    with pytest.raises(ProtocolError) as info:
        encode(follow_up(**fields))
    assert info.value.code == errors.BAD_FIELD


# -- the toy pair, live -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    family = family_for_folder(bundled_model_dir("target"))
    model, processor = family.load(bundled_model_dir("target"))
    return model, family.target(model, processor)


@pytest.fixture(scope="module")
def edge():
    with EdgeServer(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*")) as server:
        yield server


@pytest.fixture(scope="module")
def picture():
    return toy_questions(4)[3].image_png


def reference(toy, image_png: bytes, history, question: str) -> list[int]:
    """The toy target's own greedy answer to the whole conversation."""
    model, target = toy
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    inputs = dict(target.processor(images=image, text=fill_prompt(target.turns.template(history), question),
                                   return_tensors="pt"))
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def continued(address: str) -> int:
    client = EdgeClient(address, Backoff(timeout_s=5))
    try:
        pong = client.request(Ping(session="conversation-test", seq=1), expect=Pong)
    finally:
        client.close()
    return pong.turns_continued


@pytest.mark.parametrize("lead", LEADS)
def test_three_turns_are_the_targets_own_answers_to_the_conversation(toy, edge, toy_draft_int8, picture, lead):
    client = EdgeClient(edge.address, Backoff(timeout_s=10))
    before, processed = continued(edge.address), edge.target.processor.image_processor.hits
    try:
        device = CoInference(DraftArtifact.load(toy_draft_int8), client)
        with Conversation(device, picture, GenerationSettings(max_new_tokens=MAX_NEW),
                          DraftingOptions(lead=lead)) as chat:
            for number, question in enumerate(QUESTIONS):
                expected = reference(toy, picture, list(chat.history), question)
                text = "".join(chat.ask(question))
                assert chat.last_tokens == expected, (lead, number)
                assert chat.history[-1] == (question, text.strip())
    finally:
        client.close()
    assert continued(edge.address) - before == len(QUESTIONS) - 1      # every follow-up continued the edge's cache
    assert edge.target.processor.image_processor.hits - processed == len(QUESTIONS) - 1   # and reused its pixels


def test_a_follow_up_travels_without_the_image(toy, edge, toy_draft_int8, picture):
    sent = []
    client = EdgeClient(edge.address, Backoff(timeout_s=10))
    real_send = client.send
    client.send = lambda message: (sent.append(message), real_send(message))[1]
    try:
        with Conversation(CoInference(DraftArtifact.load(toy_draft_int8), client), picture,
                          GenerationSettings(max_new_tokens=8), DraftingOptions(lead="device")) as chat:
            for question in QUESTIONS[:2]:
                list(chat.ask(question))
    finally:
        client.close()
    opens = [m for m in sent if isinstance(m, Open)]
    assert [m.image.size > 0 for m in opens] == [True, False]
    assert opens[1].turns == [(QUESTIONS[0], chat.history[0][1])] and opens[1].session == opens[0].session


def ask_all(device_or_client, toy, picture, questions, between=lambda number: None, lead="device"):
    """Each question of a conversation; asserts each answer; the events traced."""
    events = []
    with Conversation(device_or_client, picture, GenerationSettings(max_new_tokens=MAX_NEW),
                      DraftingOptions(lead=lead)) as chat:
        for number, question in enumerate(questions):
            between(number)
            expected = reference(toy, picture, list(chat.history), question)
            list(chat.ask(question, trace=events.append))
            assert chat.last_tokens == expected, number
    return events


def test_an_idle_conversation_expires_and_is_reopened_with_the_image(toy, toy_draft_int8, picture):
    config = ServerConfig(bind="tcp://127.0.0.1:*", idle_timeout_s=0.3)
    with EdgeServer(bundled_model_dir("target"), config) as server:
        client = EdgeClient(server.address, Backoff(timeout_s=10))
        try:
            device = CoInference(DraftArtifact.load(toy_draft_int8), client)
            events = ask_all(device, toy, picture, QUESTIONS[:2], between=lambda n: time.sleep(1.5 if n else 0))
        finally:
            client.close()
    assert any(event["event"] == "expired" for event in events)


def test_a_conversation_evicted_for_another_device_is_reopened(toy, toy_draft_int8, picture):
    """One slot: another device's question takes the finished conversation's room between turns."""
    config = ServerConfig(bind="tcp://127.0.0.1:*", max_sessions=1)
    with EdgeServer(bundled_model_dir("target"), config) as server:
        clients = [EdgeClient(server.address, Backoff(timeout_s=10)) for _ in range(2)]
        try:
            artifact = DraftArtifact.load(toy_draft_int8)
            other = CoInference(artifact, clients[1])

            def another_device(number):
                if number:
                    other_question = toy_questions(1)[0]
                    list(other.generate(other_question.image_png, other_question.question,
                                        GenerationSettings(max_new_tokens=4), DraftingOptions(lead="device")))

            events = ask_all(CoInference(artifact, clients[0]), toy, picture, QUESTIONS[:2], another_device)
        finally:
            for client in clients:
                client.close()
    assert any(event["event"] == "expired" for event in events)


def test_a_follow_up_after_an_edge_restart_is_exact(toy, toy_draft_int8, picture):
    servers = [EdgeServer(bundled_model_dir("target"), ServerConfig(bind="tcp://127.0.0.1:*")).start()]
    client = EdgeClient(servers[0].address, Backoff(timeout_s=2, retries=2, backoff_s=0.05))

    def restart(number):
        if number == 1:
            servers[0].stop()
            servers.append(EdgeServer(bundled_model_dir("target"), ServerConfig(bind=servers[0].address)).start())

    try:
        events = ask_all(CoInference(DraftArtifact.load(toy_draft_int8), client), toy, picture, QUESTIONS, restart,
                         lead="edge")
    finally:
        client.close()
        for server in servers:
            server.stop()
    assert any(event["event"] == "expired" for event in events)


# -- the commands -------------------------------------------------------------------------------

def covspec_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "covspec", *args]


def test_device_run_with_several_prompts_is_a_scripted_conversation(toy, edge, toy_draft_int8, picture, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(picture)
    prompts = [arg for question in QUESTIONS[:2] for arg in ("--prompt", question)]
    result = subprocess.run(covspec_command("device", "run", "--artifacts", str(toy_draft_int8), "--edge",
                                            edge.address, "--image", str(image), "--max-new-tokens", str(MAX_NEW),
                                            "--json", *prompts), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    turns = json.loads(result.stdout)["turns"]
    history = []
    for turn, question in zip(turns, QUESTIONS):
        assert turn["token_ids"] == reference(toy, picture, history, question)
        history.append((question, turn["answer"]))


def test_device_chat_through_a_pseudo_terminal(toy, edge, toy_draft_int8, picture, tmp_path):
    """Typed questions stream their answers; /save writes the transcript; /image starts anew."""
    image = tmp_path / "picture.png"
    image.write_bytes(picture)
    transcript = tmp_path / "chat.json"
    leader, follower = pty.openpty()
    process = subprocess.Popen(covspec_command("device", "chat", "--artifacts", str(toy_draft_int8), "--edge",
                                               edge.address, "--image", str(image), "--max-new-tokens",
                                               str(MAX_NEW)), stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            if select.select([leader], [], [], 0.5)[0]:
                output += os.read(leader, 4096)

    try:
        for line in [QUESTIONS[0], QUESTIONS[1], f"/save {transcript}", f"/image {image}", QUESTIONS[1]]:
            read_until(b"> ")
            output = output.split(b"> ", 1)[1]
            os.write(leader, line.encode() + b"\n")
        read_until(b"> ")
        os.write(leader, b"/quit\n")
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        os.close(leader)
    saved = json.loads(transcript.read_text())["conversations"]
    assert len(saved) == 1 and [turn["question"] for turn in saved[0]["turns"]] == QUESTIONS[:2]
    history = []
    for turn, question in zip(saved[0]["turns"], QUESTIONS):
        assert turn["token_ids"] == reference(toy, picture, history, question)
        history.append((question, turn["answer"]))


# -- sampling on a follow-up --------------------------------------------------------------------

def follow_up_joint(toy, image_png: bytes, history, question: str, temperature: float, top_k: int) -> dict:
    """The toy target's exact distribution of the first two tokens of ``question``'s answer
    after ``history``: {(t1, t2): probability}."""
    model, target = toy
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    inputs = dict(target.processor(images=image, text=fill_prompt(target.turns.template(history), question),
                                   return_tensors="pt"))
    joint = {}
    with torch.no_grad():
        first = target_probs(model(**inputs).logits[0, -1].numpy(), temperature, top_k)
        for t1 in np.nonzero(first)[0]:
            ids = torch.cat([inputs["input_ids"], torch.tensor([[t1]])], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=inputs["pixel_values"]).logits
            second = target_probs(logits[0, -1].numpy(), temperature, top_k)
            for t2 in np.nonzero(second)[0]:
                joint[(int(t1), int(t2))] = first[t1] * second[t2]
    return joint


def p_value(counts: Counter, joint: dict) -> float:
    cells = sorted(set(joint) | set(counts))
    observed = np.array([counts[c] for c in cells], dtype=float)
    expected = np.array([joint.get(c, 1e-12) for c in cells]) * observed.sum()
    return chisquare(observed, expected / expected.sum() * observed.sum()).pvalue


def test_sampling_on_a_follow_up_follows_the_target(toy, edge, toy_draft_int8, picture):
    """The second turn, asked again and again on the same session (each time the edge rolls its
    cache back to the conversation's common prefix), samples the target's distribution after the
    whole conversation; the distribution without the history (the negative control) is rejected."""
    temperature, top_k, runs = 1.5, 5, 300
    client = EdgeClient(edge.address, Backoff(timeout_s=10))
    counts, drafted = Counter(), 0
    try:
        device = CoInference(DraftArtifact.load(toy_draft_int8), client)
        options = DraftingOptions(lead="device", policy="fixed", draft_len=2, pipeline=False, branches=0)
        with Conversation(device, picture, GenerationSettings(max_new_tokens=8), options) as chat:
            list(chat.ask(QUESTIONS[0]))                                   # turn 1, greedy
            history = list(chat.history)
            for seed in range(runs):
                chat.turn.history = tuple(history)
                stats = GenerationStats()
                answer = [t for chunk in device.generate(picture, QUESTIONS[1], GenerationSettings(
                    max_new_tokens=2, temperature=temperature, top_k=top_k, seed=seed), options, stats,
                    turn=chat.turn) for t in chunk]
                counts[tuple(answer)] += 1
                drafted += stats.drafted > 0
    finally:
        client.close()
    assert drafted == runs, "a run's second token was not drafted and verified"
    joint = follow_up_joint(toy, picture, history, QUESTIONS[1], temperature, top_k)
    assert set(counts) <= set(joint), "a pair the target cannot produce after this conversation"
    without_history = follow_up_joint(toy, picture, [], QUESTIONS[1], temperature, top_k)
    assert p_value(counts, joint) > 1e-3
    assert p_value(counts, without_history) < 1e-6, "the negative control was not rejected: the test has no power"


def test_bench_conversation_reports_every_configuration(toy_draft_int8, tmp_path):
    """`covspec bench conversation`, smallest: every configuration measured, every answer the
    target's own, a device-led follow-up's draft prefill a fraction of the first's (no vision
    graph, the draft's cache reused), and the long conversation followed turn by turn."""
    result = subprocess.run(covspec_command("bench", "conversation", "--artifacts", str(toy_draft_int8), "--images", "1",
                                            "--turns", "2", "--memory-turns", "2", "--max-new-tokens", "12",
                                            "--no-markdown", "--out", str(tmp_path)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "conversation.json").read_text())
    for name, entry in report["configurations"].items():
        assert entry["summary"]["wrong"] == 0 and entry["summary"]["answers"] == 2, name
    first, follow_up = report["configurations"]["device-led"]["conversations"][0]
    assert follow_up["device_prefill_s"] < first["device_prefill_s"] / 2
    assert [row["turn"] for row in report["memory"]] == [1, 2] and report["memory"][1]["edge_kv_bytes"] > 0
