"""Overlapped stages, cancellation, multi-turn KV reuse, the ring-buffered vocoder and the stream
resampler (issue 5)."""

import threading
import time

import numpy as np
import pytest

from omnilite.runtime import AudioChunk, Done, OmniliteError, Pipeline, PipelineConfig, TextDelta, Timing
from omnilite.runtime.audio import StreamResampler, prepare_speech, read_wav, resample
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.encoder import SpeechEncoder
from omnilite.runtime.llm import LlamaCppLLM
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.pipeline import Conversation
from omnilite.runtime.vocoder import UnitVocoder, VocoderStreamConfig

from conftest import QUESTION_STEREO_44K

STAGE_THREADS = ("omnilite-llm", "omnilite-units", "omnilite-vocoder")


def stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in STAGE_THREADS]


@pytest.fixture(scope="module")
def pipe(bundle):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=40, ignore_eos=True)) as p:
        yield p


@pytest.fixture(scope="module")
def second_question():
    audio, rate = read_wav(QUESTION_STEREO_44K)
    return prepare_speech(audio, rate, 16000)[::-1].copy()  # another utterance of similar length


def test_overlapped_and_sequential_give_identical_replies(pipe, question_16k):
    seen_threads: set[str] = set()
    replies = {}
    for mode in ("sequential", "overlapped"):
        events = []
        for e in pipe.respond(question_16k, 16000, mode=mode):
            seen_threads.update(stage_threads())
            events.append(e)
        replies[mode] = events
        assert stage_threads() == []  # joined before the iterator ends
    seq, ovl = replies["sequential"][-1], replies["overlapped"][-1]
    assert isinstance(seq, Done) and isinstance(ovl, Done)
    assert ovl.tokens == seq.tokens and ovl.units == seq.units and ovl.text == seq.text
    assert np.array_equal(ovl.audio, seq.audio)
    assert set(STAGE_THREADS) <= seen_threads  # the stages did run in their own threads
    waits = {e.stage for e in replies["overlapped"] if isinstance(e, Timing) and e.stage.endswith("_wait")}
    assert {"speech_generator_wait", "vocoder_wait"} <= waits
    assert ovl.timings["ttft"] <= ovl.timings["ttfa"] <= ovl.timings["total"]


def test_cancel_stops_every_stage_within_a_chunk_and_drops_queued_audio(bundle, question_16k):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=300, ignore_eos=True, queue_size=2)) as p:
        reply = p.start_reply(question_16k, 16000)
        events = iter(reply)
        for e in events:
            if isinstance(e, AudioChunk):
                break
        at_cancel = len(reply.state.tokens)
        t = time.perf_counter()
        reply.cancel()
        after = list(events)  # the iteration ends: no Done, no more audio
        stop_s = time.perf_counter() - t
        assert not any(isinstance(e, (AudioChunk, Done)) for e in after)
        assert stage_threads() == []
        # The LLM checks between tokens: at most one more token after cancel().
        assert len(reply.state.tokens) <= at_cancel + 1 < 300
        assert stop_s < 2.0  # one chunk of work, not the rest of a 300-token reply
        # The pipeline is free for the next question.
        assert isinstance(list(p.respond(question_16k, 16000))[-1], Done)


def test_closing_the_iterator_cancels_and_joins(pipe, question_16k):
    it = pipe.respond(question_16k, 16000)
    for e in it:
        if isinstance(e, TextDelta):
            break
    it.close()
    assert stage_threads() == []
    assert isinstance(list(pipe.respond(question_16k, 16000))[-1], Done)


def test_one_reply_at_a_time(pipe, question_16k):
    first = pipe.respond(question_16k, 16000)
    next(first)
    with pytest.raises(OmniliteError, match="already answering"):
        next(pipe.respond(question_16k, 16000))
    first.close()


def test_stage_error_reaches_the_caller_and_leaves_no_thread(bundle, question_16k, monkeypatch):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=30, ignore_eos=True)) as p:
        def broken(frame_units):
            raise RuntimeError("vocoder exploded")

        monkeypatch.setattr(p.vocoder, "generate", broken)
        with pytest.raises(RuntimeError, match="vocoder exploded"):
            list(p.respond(question_16k, 16000))
        assert stage_threads() == []


def test_second_turn_reuses_the_cache_and_equals_a_full_recompute(bundle, question_16k, second_question):
    b = load_bundle(bundle)
    with Pipeline(b, PipelineConfig(max_new_tokens=12, ignore_eos=True)) as p:
        conv = Conversation()
        d1 = list(p.respond(question_16k, 16000, conversation=conv))[-1]
        d2 = list(p.respond(second_question, 16000, conversation=conv))[-1]
        turn_prefix = p.turn_prefix_ids
    assert conv.turns == 2 and d2.turn == 2
    assert d1.stats["prompt_tokens"] == d1.stats["context"]
    # Turn 2 evaluates only its own positions: the last reply token, the user header, speech, instruction.
    positions = len(SpeechEncoder(b)(second_question))  # the bundle's default encoder mode, as the pipeline
    assert d2.stats["prompt_tokens"] == 1 + len(turn_prefix) + positions + len(b["llm"]["prompt"]["suffix_ids"])
    assert d2.stats["prompt_tokens"] < d2.stats["context"]
    assert d2.stats["context"] == d1.stats["context"] + len(d1.tokens) + d2.stats["prompt_tokens"] - 1

    # The same dialogue evaluated from scratch in one fresh context.
    enc = SpeechEncoder(b)
    prompt = b["llm"]["prompt"]
    with LlamaCppLLM(b.file("llm")) as llm:
        llm.eval_tokens(prompt["prefix_ids"])
        llm.eval_embeddings(enc(question_16k))
        llm.eval_tokens(prompt["suffix_ids"] + d1.tokens + turn_prefix)
        llm.eval_embeddings(enc(second_question))
        first = llm.eval_tokens(prompt["suffix_ids"], want_last=True)
        pairs = list(llm.generate(12, ignore_eos=True, first=first))
        assert llm.n_past == d2.stats["context"] + 11
    assert [t for t, _ in pairs] == d2.tokens


def test_cancel_before_the_reply_starts_forgets_the_user_turn(bundle, question_16k):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=8, ignore_eos=True)) as p:
        conv = Conversation()
        list(p.respond(question_16k, 16000, conversation=conv))
        p.prepare(conv)
        prepared = p.llm.n_past
        reply = p.start_reply(question_16k, 16000, conversation=conv)
        reply.cancel()
        assert list(reply) == []
        assert conv.turns == 1 and p.llm.n_past == prepared == conv.prepared_at


def test_full_context_drops_history_instead_of_failing(bundle, question_16k):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=8, ignore_eos=True, n_ctx=400)) as p:
        assert p.llm.n_ctx < 2 * 371  # (llama.cpp may round n_ctx up)
        conv = Conversation()
        d1 = list(p.respond(question_16k, 16000, conversation=conv))[-1]
        d2 = list(p.respond(question_16k, 16000, conversation=conv))[-1]
    assert "history_dropped" not in d1.stats and d2.stats["history_dropped"] == 1
    assert d2.tokens == d1.tokens  # a fresh first turn again


def test_bad_pipeline_options_are_one_sentence(bundle):
    with pytest.raises(OmniliteError, match="mode 'turbo' is unknown"):
        Pipeline.load(bundle, PipelineConfig(mode="turbo"))
    with pytest.raises(OmniliteError, match="cannot hold one turn"):
        Pipeline.load(bundle, PipelineConfig(n_ctx=100))


# --- ring-buffered vocoder --------------------------------------------------------------------

@pytest.fixture(scope="module")
def units(pipe, question_16k):
    return list(pipe.respond(question_16k, 16000))[-1].units


def _stream(voc, units, config, burst=9):
    st = voc.stream(config)
    chunks = [st.push(units[a:a + burst]) for a in range(0, len(units), burst)] + [st.flush()]
    return [c for c in chunks if len(c)], st


@pytest.mark.parametrize("config,min_snr", [
    (VocoderStreamConfig(), 30.0),  # the default: context and lookahead cover the receptive field
    (VocoderStreamConfig(lookahead=6), 30.0),  # lower latency: cross-faded seams
])
def test_streamed_vocoding_matches_offline_without_seam_clicks(bundle, units, config, min_snr):
    voc = UnitVocoder(load_bundle(bundle))
    offline = voc.offline(units)
    chunks, _ = _stream(voc, units, config)
    streamed = np.concatenate(chunks)
    snr = snr_db(offline, streamed)
    print(f"streamed vs offline SNR {snr:.1f} dB with {config}")
    assert len(chunks) >= 3 and snr >= min_snr
    inside = max(float(np.max(np.abs(np.diff(c)))) for c in chunks if len(c) > 1)
    seams = max(abs(float(b[0]) - float(a[-1])) for a, b in zip(chunks, chunks[1:]))
    assert seams <= inside


def test_vocoder_ring_memory_does_not_grow_with_reply_length(bundle):
    voc = UnitVocoder(load_bundle(bundle))
    rng = np.random.default_rng(0)
    short = rng.integers(0, 1000, 60).tolist()
    long = rng.integers(0, 1000, 600).tolist()
    _, st_short = _stream(voc, short, VocoderStreamConfig())
    _, st_long = _stream(voc, long, VocoderStreamConfig())
    bound = 2 * voc.receptive_field + 9 * int(max(voc.durations(np.asarray(long)))) + 1
    assert st_long.max_buffered_frames <= bound
    assert st_long.max_buffered_frames <= st_short.max_buffered_frames + 9 * 8  # flat, not 10x


# --- stream resampler -------------------------------------------------------------------------

@pytest.mark.parametrize("src", [8000, 11025, 44100, 48000, 16000])
def test_stream_resampler_equals_offline_resampling(src):
    rng = np.random.default_rng(src)
    x = (0.1 * rng.standard_normal(src)).astype(np.float32)
    r = StreamResampler(src, 16000)
    parts, pos = [], 0
    while pos < len(x):
        n = int(rng.integers(1, src // 25 + 1))  # blocks of up to 40 ms
        parts.append(r.push(x[pos:pos + n]))
        pos += n
    parts.append(r.flush())
    assert np.array_equal(np.concatenate(parts), resample(x, src, 16000))


def test_frame_ring_streams_any_frame_vocoder():
    """The same ring serves a vocoder of mel-like float frames (here a numpy stand-in whose
    receptive field is exactly `rf` frames each side)."""
    from omnilite.runtime.vocoder import FrameRing

    hop, rf, dim = 80, 5, 8
    rng = np.random.default_rng(0)
    proj = rng.standard_normal(dim).astype(np.float32)
    kernel = np.hanning(2 * rf * hop - hop + 1).astype(np.float32)

    def generate(frames: np.ndarray) -> np.ndarray:
        excitation = np.repeat(frames @ proj, hop)
        half = len(kernel) // 2  # (mode="same" centres on the longer input, wrong for short chunks)
        full = np.convolve(excitation, kernel)
        return (full[half:half + len(excitation)] / kernel.sum()).astype(np.float32)

    frames = rng.standard_normal((400, dim)).astype(np.float32)
    offline = generate(frames)
    for config, min_snr in ((VocoderStreamConfig(), 120.0), (VocoderStreamConfig(lookahead=3), 20.0)):
        ring = FrameRing(generate, hop, rf, config)
        parts = [ring.push(frames[a:a + 7]) for a in range(0, len(frames), 7)] + [ring.push(frames[:0], final=True)]
        streamed = np.concatenate(parts)
        assert len(streamed) == len(offline) and snr_db(offline, streamed) >= min_snr
        assert ring.max_buffered_frames <= ring.left + ring.lookahead + 2 * 7  # flat: 400 frames went through


def test_live_runtime_modules_are_torch_free():
    import subprocess
    import sys

    code = ("import sys, omnilite.runtime.session, omnilite.runtime.vad, omnilite.runtime.audio_io, "
            "omnilite.benchmarks.streaming; from omnilite.runtime.vad import make_vad; make_vad('auto');"
            "bad = [m for m in ('torch', 'silero_vad', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
