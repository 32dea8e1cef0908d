"""Work that moves before the end of speech (issue 14): a turn fed as it arrives, speculative
replies committed or dropped, and the Session's explicit turn control (push-to-talk, clear, cancel).

Every check compares with the offline answer to the same audio: the tokens must be identical."""

import threading
import time

import numpy as np
import pytest

from omnilite.runtime import Done, Pipeline, PipelineConfig
from omnilite.runtime.events import AudioChunk, Interrupted, TurnEnded, TurnStarted
from omnilite.runtime.pipeline import Conversation
from omnilite.runtime.session import Session, SessionConfig
from omnilite.runtime.vad import WINDOW

S = 16000


def _done(events) -> Done:
    return [e for e in events if isinstance(e, Done)][-1]


@pytest.fixture(scope="module")
def long_question(question_16k):
    """12 s: two full 5 s blocks and a partial one in blocked-5s modes."""
    return np.concatenate([question_16k] * 6)[: 12 * S]


@pytest.fixture(scope="module")
def blocked(bundle):
    with Pipeline.load(bundle, PipelineConfig(encoder_mode="blocked-5s+fill", max_new_tokens=12, ignore_eos=True)) as p:
        yield p


@pytest.mark.parametrize("mode", ["sequential", "overlapped"])
def test_blocked_turn_prefills_completed_blocks_while_fed_and_answers_as_offline(blocked, long_question, mode):
    offline = _done(blocked.respond(long_question, S, mode=mode))
    conv = Conversation()
    turn = blocked.begin_turn(conv)
    prefilled_at = []
    for a in range(0, len(long_question), 4000):  # 250 ms blocks, as a microphone delivers them
        turn.feed(long_question[a:a + 4000])
        prefilled_at.append(turn.prefilled)
    # The two completed 5 s blocks (50 positions each) went in as soon as each was complete.
    assert prefilled_at[19] == 50 and prefilled_at[39] == 100 and prefilled_at[-1] == 100
    assert blocked.llm.n_past == turn.prefilled_at == conv.prepared_at + 100
    done = _done(blocked.reply_to(turn, mode=mode))
    assert done.tokens == offline.tokens and done.units == offline.units
    assert done.stats["prefilled_early"] == 100 and done.stats["prompt_tokens"] == offline.stats["prompt_tokens"]
    assert done.stats["context"] == offline.stats["context"] and conv.turns == 1 and turn.closed


def test_exact_mode_moves_only_the_prompt(bundle, question_16k):
    with Pipeline.load(bundle, PipelineConfig(encoder_mode="exact", max_new_tokens=8, ignore_eos=True)) as p:
        offline = _done(p.respond(question_16k, S))
        conv = Conversation()
        p.prepare(conv)
        turn = p.begin_turn(conv)
        for a in range(0, len(question_16k), 3000):
            assert turn.feed(question_16k[a:a + 3000]) == 0
        assert p.llm.n_past == conv.prepared_at and turn.prefilled == 0
        done = _done(p.reply_to(turn))
    assert done.tokens == offline.tokens and done.stats["prefilled_early"] == 0


def _run_in_thread(reply):
    events: list = []
    t = threading.Thread(target=lambda: events.extend(reply), daemon=True)
    t.start()
    return t, events


@pytest.mark.parametrize("when", ["streaming", "finished"])
def test_dropped_speculative_reply_leaves_no_trace(blocked, long_question, when):
    """Speech resumes after a speculative start: the cache goes back to the turn as fed (even when
    the reply had already produced all its audio), and the turn, fed on, answers as offline."""
    first, rest = long_question[: 7 * S], long_question[7 * S:]
    offline = _done(blocked.respond(long_question, S))
    conv = Conversation()
    turn = blocked.begin_turn(conv)
    turn.feed(first)
    fed_at = blocked.llm.n_past
    reply = blocked.reply_to(turn, speculative=True)
    t, events = _run_in_thread(reply)
    deadline = time.time() + 60
    while time.time() < deadline:
        audio = [e for e in list(events) if isinstance(e, AudioChunk)]
        if audio and (when == "streaming" or len(reply.state.tokens) == blocked.config.max_new_tokens):
            break
        time.sleep(0.01)
    if when == "finished":
        time.sleep(0.3)  # every stage done; the LLM stage waits for commit or drop
        assert t.is_alive() and not any(isinstance(e, Done) for e in events)
    reply.drop()
    t.join(30)
    assert not t.is_alive() and not any(isinstance(e, Done) for e in events)
    assert blocked.llm.n_past == fed_at and conv.turns == 0 and not turn.closed
    turn.feed(rest)
    done = _done(blocked.reply_to(turn))
    assert done.tokens == offline.tokens and conv.turns == 1


def test_committed_speculative_reply_is_recorded(blocked, question_16k):
    offline = _done(blocked.respond(question_16k, S))
    conv = Conversation()
    turn = blocked.begin_turn(conv)
    turn.feed(question_16k)
    reply = blocked.reply_to(turn, speculative=True)
    t, events = _run_in_thread(reply)
    time.sleep(0.2)
    assert conv.turns == 0  # not recorded before the commit
    reply.commit()
    t.join(60)
    done = _done(events)
    assert done.tokens == offline.tokens and conv.turns == 1 and turn.closed
    with pytest.raises(Exception, match="has been committed; cancel"):
        reply.drop()


# --- Session -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(bundle):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=10, ignore_eos=True, n_ctx=4096)) as p:
        yield p


def _drive(session, audio, block=512, pace=0.0, extra_s=3.0, settle=True):
    """Feed 16 kHz audio block by block (then silence), draining the speaker; returns all events
    (with `settle`, once the session is idle again)."""
    events = []
    x = np.concatenate([audio, np.zeros(int(extra_s * S), np.float32)])
    for a in range(0, len(x), block):
        session.feed(x[a:a + block], S)
        session.read_output(block * 3)  # 24 kHz or 16 kHz output: drain generously
        events += session.poll()
        if pace:
            time.sleep(block / S / pace)
    deadline = time.time() + 60
    while settle and not session.idle and time.time() < deadline:
        session.read_output(4096)
        events += session.poll(0.01)
    return events + session.poll()


def _utterance(x, ended: TurnEnded, pad_ms=160):
    start = int(round(ended.start * S))
    end = int(round(ended.end_of_speech * S)) + round(pad_ms / 1000 * S / WINDOW) * WINDOW
    return x[start:end]


@pytest.mark.parametrize("speculative", [True, False])
def test_session_speculative_start_gives_the_same_reply(pipe, question_16k, speculative):
    x = np.concatenate([np.zeros(S // 2, np.float32), question_16k])
    with Session(pipe, SessionConfig(vad="silero", speculative_start=speculative)) as session:
        events = _drive(session, x, pace=4.0)
        wasted = session.wasted_starts
    ended = [e for e in events if isinstance(e, TurnEnded)]
    done = _done(events)
    assert len(ended) == 1 and done.turn == 1 and wasted == 0
    offline = _done(pipe.respond(_utterance(np.concatenate([x, np.zeros(3 * S, np.float32)]), ended[0]), S))
    assert done.tokens == offline.tokens


@pytest.fixture(scope="module")
def speech(question_16k):
    loud = np.flatnonzero(np.abs(question_16k) > 0.02)
    return question_16k[loud[0]:loud[-1] + 1]  # without the file's own leading/trailing silence


def test_session_pause_shorter_than_the_hangover_wastes_a_start_then_answers_the_whole_turn(pipe, speech):
    pause = np.zeros(int(0.4 * S), np.float32)  # > pad_ms (160): a speculative start; < 600 ms
    x = np.concatenate([np.zeros(S // 2, np.float32), speech, pause, speech])
    with Session(pipe, SessionConfig(vad="energy")) as session:
        events = _drive(session, x, pace=2.0)
        wasted = session.wasted_starts
    ended = [e for e in events if isinstance(e, TurnEnded)]
    assert len(ended) == 1 and wasted >= 1  # espeak's own pauses may add more
    done = _done(events)
    offline = _done(pipe.respond(_utterance(np.concatenate([x, np.zeros(3 * S, np.float32)]), ended[0]), S))
    assert done.tokens == offline.tokens and done.stats["prompt_tokens"] == offline.stats["prompt_tokens"]
    assert not any(isinstance(e, Done) for e in events[: events.index(ended[0])])


def test_push_to_talk_commit_clear_and_cancel(pipe, question_16k, speech):
    n = len(question_16k) // WINDOW * WINDOW
    with Session(pipe, SessionConfig(turn_detection=False)) as session:
        assert session.commit() is False  # nothing to answer yet
        session.feed(question_16k[:8000], S)
        session.clear_input()
        assert session.commit() is False
        session.feed(question_16k[:n], S)
        time.sleep(1.0)  # no endpointer: nothing happens until the commit
        assert not any(isinstance(e, TurnEnded) for e in session.poll())
        assert session.commit() is True
        events = _drive(session, np.zeros(0, np.float32), extra_s=0.0)
        done = _done(events)
        assert done.tokens == _done(pipe.respond(question_16k[:n], S)).tokens
        assert [type(e) for e in events].count(TurnEnded) == 1
        # response.cancel: a reply in progress stops with reason "cancelled".
        session.feed(question_16k[:n], S)
        session.commit()
        deadline = time.time() + 30
        while not session.cancel_reply() and time.time() < deadline:
            time.sleep(0.005)
        events = _drive(session, np.zeros(0, np.float32), extra_s=0.0)
        stops = [e for e in events if isinstance(e, Interrupted)]
        assert len(stops) == 1 and stops[0].reason == "cancelled" and not any(isinstance(e, Done) for e in events)
        assert session.cancel_reply() is False
    with Session(pipe, SessionConfig(vad="energy")) as session:
        events = _drive(session, speech, extra_s=0.3, settle=False)  # silence shorter than the hangover
        assert any(isinstance(e, TurnStarted) for e in events) and session.commit() is True
        events = _drive(session, np.zeros(0, np.float32), extra_s=0.0)
        assert _done(events).turn == 1


# --- the first chunk (LLaMA-Omni) ----------------------------------------------------------------

def test_short_first_chunks_give_the_same_audio_after_fewer_llm_tokens(bundle, question_16k):
    """Chunks of `first_omega` tokens until the first sample is out: the units and the audio are
    those of the steady chunking (the unit generator and the vocoder stream exactly), and fewer
    LLM tokens stand before the first audio sample (counted, not timed)."""
    got = {}
    for first in (10, 3, 1):
        with Pipeline.load(bundle, PipelineConfig(first_omega=first, max_new_tokens=40, ignore_eos=True)) as p:
            d = _done(p.respond(question_16k, S, mode="sequential"))
        decodes = sum(1 for name, a, _ in d.spans if name == "llm_decode" and a < d.timings["ttfa"])
        got[first] = (d, decodes)
    ref = got[10][0]
    for first, (d, decodes) in got.items():
        assert d.tokens == ref.tokens and d.units == ref.units
        assert np.array_equal(d.audio, ref.audio)
    assert got[1][1] <= got[3][1] < got[10][1] == 10


def test_llm_gets_every_core_until_the_first_audio_sample(bundle, question_16k, monkeypatch):
    """Thread budget per phase: the LLM stage prefills and decodes on every core until the first
    sample is out, then goes back to its own share (set from its own thread, between tokens)."""
    with Pipeline.load(bundle, PipelineConfig(threads=2, stage_threads={"llm": 1}, max_new_tokens=30, ignore_eos=True)) as p:
        calls = []
        set_threads = p.llm.set_threads
        monkeypatch.setattr(p.llm, "set_threads", lambda *a: (calls.append((a, threading.current_thread().name)), set_threads(*a)))
        events = list(p.respond(question_16k, S))
    assert [a for a, _ in calls] == [(2, 2), (1, 2)]  # all cores, then the LLM's own share
    assert {name for _, name in calls} == {"omnilite-llm"}
    assert any(isinstance(e, AudioChunk) for e in events)


# --- instructions (a system prompt other than the bundle's) --------------------------------------

INSTRUCTIONS = "Answer in French, in one short sentence."


def test_instructions_replace_the_system_prompt_as_the_template_would(bundle, reference, question_16k):
    """The runtime swaps the system prompt's tokens inside the exported prefix; the result equals the
    official template rendered with the new text, and the reply equals the PyTorch reference's."""
    import torch

    from omnilite.export.prompt import speech_prompt
    from omnilite.export.reference import greedy_decode

    expected = speech_prompt(reference.ckpt.model_dir / "tokenizer.json", system=INSTRUCTIONS)
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=12, ignore_eos=True)) as p:
        assert p.prefix_for(INSTRUCTIONS) == expected.prefix_ids != p.prefix_ids
        assert p.prefix_for(None) == p.prefix_for(p.bundle["llm"]["prompt"]["system"]) == p.prefix_ids
        done = _done(p.respond(question_16k, S, conversation=Conversation(system=INSTRUCTIONS)))
        with pytest.raises(Exception, match="the instructions are empty"):
            p.prefix_for("  ")
    _, embeds = reference.speech_embeddings(question_16k)
    with torch.no_grad():
        tokens, _ = greedy_decode(reference.llm, expected.prefix_ids, embeds, expected.suffix_ids, 12, reference.eos_ids, True)
    assert done.tokens == tokens
    assert done.stats["prompt_tokens"] == len(expected.prefix_ids) + 300 + len(expected.suffix_ids)


def test_instructions_on_llama_omni2_and_in_a_session(omni2_bundle, omni2_checkpoint, question_16k):
    from omnilite.export.omni2.checkpoint import Omni2Checkpoint
    from omnilite.export.omni2.reference import render_prompt

    expected = render_prompt(Omni2Checkpoint.open(omni2_checkpoint).tokenizer_dir, system=INSTRUCTIONS)
    with Pipeline.load(omni2_bundle, PipelineConfig(max_new_tokens=4, ignore_eos=True)) as p:
        assert p.prefix_for(INSTRUCTIONS) == expected.prefix_ids != p.prefix_ids
        with Session(p, SessionConfig(turn_detection=False, instructions=INSTRUCTIONS)) as session:
            assert session.conversation.system == INSTRUCTIONS
            session.feed(question_16k[: len(question_16k) // WINDOW * WINDOW], S)
            session.commit()
            events = _drive(session, np.zeros(0, np.float32), extra_s=0.0)
        assert p.llm.n_past >= len(expected.prefix_ids) and _done(events).turn == 1
