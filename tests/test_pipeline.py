"""The torch-free runtime against the PyTorch reference pipeline, end to end."""

import numpy as np
import pytest

from omnilite.runtime import AudioChunk, Done, Pipeline, PipelineConfig, TextDelta, Timing
from omnilite.runtime.audio import prepare_speech, read_wav
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.encoder import SpeechEncoder
from omnilite.runtime.llm import LlamaCppLLM
from omnilite.runtime.metrics import cosine_rows, snr_db

from conftest import QUESTION_STEREO_44K


def _run(pipe, audio, rate):
    events = list(pipe.respond(audio, rate))
    done = events[-1]
    assert isinstance(done, Done)
    return events, done


@pytest.fixture(scope="module")
def reference_reply(reference, question_16k):
    return reference.generate(question_16k, max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def pipeline(bundle):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=40, ignore_eos=True)) as pipe:
        yield pipe


def test_llm_hidden_states_match_reference(bundle, reference_reply, question_16k):
    b = load_bundle(bundle)
    embeds = SpeechEncoder(b)(question_16k)
    prompt = b["llm"]["prompt"]
    with LlamaCppLLM(b.file("llm")) as llm:
        llm.eval_tokens(prompt["prefix_ids"])
        llm.eval_embeddings(embeds)
        first = llm.eval_tokens(prompt["suffix_ids"], want_last=True)
        pairs = list(llm.generate(40, ignore_eos=True, first=first))
    assert [t for t, _ in pairs] == reference_reply.tokens
    assert cosine_rows(np.stack([h for _, h in pairs]), reference_reply.hidden).min() >= 0.999


def test_runtime_reply_matches_reference(pipeline, reference_reply, question_16k):
    events, done = _run(pipeline, question_16k, 16000)
    assert len(done.tokens) == 40 and done.tokens == reference_reply.tokens
    assert done.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert done.text == pipeline.llm.detokenize(reference_reply.tokens)
    assert done.units == reference_reply.units
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2  # streamed, not one blob at the end
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), done.audio)
    assert snr_db(reference_reply.audio, done.audio) >= 30.0
    stages = {e.stage for e in events if isinstance(e, Timing)}
    assert {"mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder", "ttft", "ttfa", "total"} <= stages
    assert done.timings["ttft"] <= done.timings["ttfa"] <= done.timings["total"]


@pytest.mark.parametrize("omega", [1, 4, 25])
def test_omega_changes_chunking_not_output(bundle, reference_reply, question_16k, omega):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=40, ignore_eos=True, omega=omega)) as pipe:
        _, done = _run(pipe, question_16k, 16000)
    assert done.units == reference_reply.units
    assert snr_db(reference_reply.audio, done.audio) >= 30.0


def test_natural_stop_text_matches_reference(bundle, reference, question_16k):
    ref = reference.generate(question_16k, max_new_tokens=24)
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=24)) as pipe:
        _, done = _run(pipe, question_16k, 16000)
        assert done.tokens == ref.tokens
        assert done.text == pipe.llm.detokenize([t for t in ref.tokens if t not in reference.eos_ids])


def test_stereo_44k_input_is_mixed_and_resampled_before_encoding(pipeline):
    audio, rate = read_wav(QUESTION_STEREO_44K)
    _, from_file = _run(pipeline, audio, rate)
    _, from_16k = _run(pipeline, prepare_speech(audio, rate, 16000), 16000)
    assert from_file.tokens == from_16k.tokens and from_file.units == from_16k.units
    assert np.array_equal(from_file.audio, from_16k.audio)
    # (Agreement with the reference on this clip is not asserted token for token: at step 13 the
    # random-weight LLM's top two logits differ by 0.002, a tie that f32 rounding order decides.)


def test_unpadded_mode_runs_and_reports_fewer_positions(bundle, question_16k):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=8, ignore_eos=True, encoder_mode="unpadded")) as pipe:
        assert pipe.encoder(question_16k, "unpadded").shape[0] == len(question_16k) // 1600
        _, done = _run(pipe, question_16k, 16000)
    assert len(done.tokens) == 8
