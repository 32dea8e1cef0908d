"""The torch-free LLaMA-Omni2 runtime end to end against the PyTorch reference."""

import subprocess
import sys

import numpy as np
import pytest

from omnilite.runtime import AudioChunk, Done, Pipeline, PipelineConfig, TextDelta, Timing
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.omni2.flow import FlowStreamConfig
from omnilite.runtime.omni2.pipeline import Omni2Pipeline, Omni2PipelineConfig

from omni2_fixtures import MAX_TTS, N_TOKENS

# The reference synthesises whole utterances; the runtime's exact schedule (first hop = the chunk, every
# chunk in the window) equals it.
EXACT_FLOW = FlowStreamConfig(window_tokens=None)


def _run(pipe, audio, rate=16000):
    events = list(pipe.respond(audio, rate))
    assert isinstance(events[-1], Done)
    return events, events[-1]


@pytest.mark.parametrize("mode", ["overlapped", "sequential"])
def test_reply_matches_reference(omni2_bundle, omni2_reply, question_16k, mode):
    config = Omni2PipelineConfig(max_new_tokens=N_TOKENS, ignore_eos=True, max_tts_tokens=MAX_TTS, mode=mode, flow=EXACT_FLOW)
    with Pipeline.load(omni2_bundle, config) as pipe:
        assert isinstance(pipe, Omni2Pipeline)  # chosen from the manifest's family
        events, done = _run(pipe, question_16k)
        assert done.text == pipe.llm.detokenize(omni2_reply.tokens)
    assert done.tokens == omni2_reply.tokens and done.units == omni2_reply.units
    assert done.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2 and all(c.sample_rate == 24000 for c in chunks)
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), done.audio)
    assert snr_db(omni2_reply.audio, done.audio) >= 30.0
    stages = {e.stage for e in events if isinstance(e, Timing)}
    assert {"encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder", "ttft", "ttfa", "total"} <= stages
    assert done.timings["flow"] > 0 and done.timings["hift"] > 0
    assert done.timings["ttft"] <= done.timings["ttfa"] <= done.timings["total"]


@pytest.mark.parametrize("read,write", [(1, 5), (5, 15)])
def test_read_write_are_runtime_options(omni2_bundle, omni2_reference, question_16k, read, write):
    ref = omni2_reference.generate(question_16k, max_new_tokens=12, ignore_eos=True, read=read, write=write, max_tts_tokens=30)
    config = Omni2PipelineConfig(max_new_tokens=12, ignore_eos=True, max_tts_tokens=30, read=read, write=write, mode="sequential",
                                 flow=EXACT_FLOW)
    with Pipeline.load(omni2_bundle, config) as pipe:
        assert (pipe.read, pipe.write) == (read, write)
        _, done = _run(pipe, question_16k)
        assert pipe.units.tts_tokens == ref.tts_tokens
    assert done.units == ref.units
    assert snr_db(ref.audio, done.audio) >= 30.0


def test_plain_pipeline_config_maps_omega_to_read(omni2_bundle):
    with Pipeline.load(omni2_bundle, PipelineConfig(omega=4, max_new_tokens=8)) as pipe:
        assert isinstance(pipe, Omni2Pipeline) and (pipe.read, pipe.write) == (4, 10)


def test_bad_read_write_is_one_sentence(omni2_bundle):
    from omnilite.runtime.errors import OmniliteError

    with pytest.raises(OmniliteError, match="read/write must be at least 1 token each"):
        Pipeline.load(omni2_bundle, Omni2PipelineConfig(write=-1))


def test_omni2_runtime_imports_no_torch():
    code = ("import sys, omnilite.runtime.omni2.pipeline;"
            "bad = [m for m in ('torch', 'transformers', 'safetensors', 'gguf', 'onnx') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_second_turn_and_cancel_use_the_shared_conversation_machinery(omni2_bundle, question_16k):
    """The same Conversation / cancel API as LLaMA-Omni: a follow-up turn evaluates only its own
    positions (Qwen's turn separator from the manifest), and cancel() stops the TTS, flow and HiFT
    stages and frees the pipeline; the TTS LM starts each reply afresh."""
    import time

    from omnilite.runtime.pipeline import Conversation

    config = Omni2PipelineConfig(max_new_tokens=9, ignore_eos=True, max_tts_tokens=20, queue_size=2)
    with Pipeline.load(omni2_bundle, config) as pipe:
        conv = Conversation()
        d1 = list(pipe.respond(question_16k, 16000, conversation=conv))[-1]
        d2 = list(pipe.respond(question_16k, 16000, conversation=conv))[-1]
        assert pipe.turn_prefix_ids == pipe.llm.tokenize("<|im_end|>\n<|im_start|>user\n", special=True)
        assert conv.turns == 2 and d2.turn == 2
        assert d2.stats["prompt_tokens"] == 1 + len(pipe.turn_prefix_ids) + 300 + len(pipe.suffix_ids)
        assert len(d2.units) > 0 and len(d2.audio) > 0

        reply = pipe.start_reply(question_16k, 16000)
        events = iter(reply)
        for e in events:
            if isinstance(e, TextDelta):
                break
        t = time.perf_counter()
        reply.cancel()
        after = list(events)
        assert not any(isinstance(e, Done) for e in after)
        assert time.perf_counter() - t < 5.0
        done = list(pipe.respond(question_16k, 16000))[-1]
        assert isinstance(done, Done) and len(done.tokens) == 9
