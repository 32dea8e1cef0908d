"""LLaMA-Omni2's first-chunk fast path: the flow's first step on 17 tokens (two TTS writes with the
3-token lookahead; CosyVoice2's own streaming starts at 25) instead of the 50-token chunk, then chunk-aligned steps; and the thread budget per phase for the
TTS LM. Seam quality is streamed vs whole-utterance synthesis (SNR), on the tiny random-weight
checkpoint, whose near-uniform attention makes every missing token count (a pessimistic case)."""

import numpy as np
import pytest

from omnilite.runtime import AudioChunk, Done, Pipeline
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.omni2.flow import FIRST_HOP_TOKENS, FlowDecoder, FlowStreamConfig
from omnilite.runtime.omni2.hift import HiFTVocoder
from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig
from omnilite.runtime.vocoder import VocoderStreamConfig

from omni2_fixtures import MAX_TTS, N_TOKENS

# Mel SNR of the first hop's frames (the only ones that drift) against whole-utterance synthesis, and
# of a 4 s reply. Not 25 dB: those frames are solved from the first 20 tokens, as a 17-token chunk
# (CosyVoice2's trained streaming chunk) would solve them, and on this random flow, whose attention
# is near uniform over the 50-token chunk, chunk-25 synthesis itself is 17 dB from chunk-50 synthesis
# there. No first hop below the chunk reaches 25 dB on these frames (measured: 5 tokens 12-15 dB,
# 10: 14.5-15.3, 15: 14.9-15.7, 17: 13.8-14.0, 25: 17.2-17.3, 40: 22.3-24.1; the reply at 17:
# 22.8-22.9, at 25: 24.6-24.7); every later frame is exact. A fault that shifts the noise or drops a
# chunk's context gives a few dB at most (tests/test_omni2_flow_cache.py injects those).
FIRST_HOP_SNR_DB = 12.0
REPLY_SNR_DB = 21.0


@pytest.fixture(scope="module")
def parts(omni2_bundle):
    b = load_bundle(omni2_bundle)
    return FlowDecoder(b), HiFTVocoder(b)


def _units(n: int) -> list[int]:
    return np.random.default_rng(1).integers(0, 6561, n).tolist()


def _stream(flow, voc, units, config, burst=10):
    """Units `burst` at a time (the R/W loop writes W=10 per step); returns (mel, audio, flow stream,
    units that had arrived when the first audio sample came out)."""
    mel, audio, fs, first, _ = _stream_steps(flow, voc, units, config, burst)
    return mel, audio, fs, first


def _stream_steps(flow, voc, units, config, burst=10):
    """`_stream`, plus the units that had arrived at the first flow step."""
    fs, hs = flow.stream(config), voc.stream()
    mels, audio, first, first_step = [], [], None, None
    for a in range(0, len(units), burst):
        mels.append(fs.push(units[a:a + burst]))
        audio.append(hs.push(mels[-1]))
        if first_step is None and fs.steps:
            first_step = min(a + burst, len(units))
        if first is None and len(audio[-1]):
            first = min(a + burst, len(units))
    mels.append(fs.flush())
    audio += [hs.push(mels[-1]), hs.flush()]
    return np.concatenate(mels, axis=1), np.concatenate(audio), fs, first, first_step


def test_default_first_hop_is_short_and_keeps_the_seam(parts):
    flow, voc = parts
    config = Omni2PipelineConfig().flow
    assert config.first_hop_tokens == FIRST_HOP_TOKENS == 17 and flow.chunk_tokens == 50
    units = _units(100)  # 4 s: inside the window, so every frame but the first hop's is exact
    whole = flow.offline(units)
    mel, audio, fs, first = _stream(flow, voc, units, config, burst=1)
    # The first audio comes from the first flow step, at 17 + 3 lookahead tokens (exact: 53).
    assert fs.steps == 3 and first == 20, (fs.steps, first)
    hop_frames = FIRST_HOP_TOKENS * flow.ratio
    assert fs.drift_frames == hop_frames and not fs.exact
    # Every frame after the first hop equals whole-utterance synthesis...
    assert np.abs(mel[:, hop_frames:] - whole[:, hop_frames:]).max() <= 1e-4 * np.abs(whole).max()
    # ...and the first hop's frames, solved before the rest of their chunk existed, stay close.
    first_hop = snr_db(whole[:, :hop_frames].ravel(), mel[:, :hop_frames].ravel())
    reply = snr_db(whole.ravel(), mel.ravel())
    print(f"first hop {FIRST_HOP_TOKENS}: mel SNR vs whole utterance {first_hop:.1f} dB on its frames, {reply:.1f} dB on the reply")
    assert first_hop >= FIRST_HOP_SNR_DB and reply >= REPLY_SNR_DB, (first_hop, reply)
    # HiFT streams that mel exactly (its ring covers the receptive field): no seam of its own.
    assert len(audio) == mel.shape[1] * voc.hop and snr_db(voc.offline(mel), audio) >= 60.0


@pytest.mark.parametrize("first_hop", [10, 25])
def test_first_hop_sweep_is_exact_after_the_first_step(parts, first_hop):
    """Any first hop: the first flow step at first_hop + 3 tokens, every step after it on a chunk
    boundary, so only the first step's frames drift. (Audio needs more: HiFT holds back its f0
    context and receptive field, 5 + 15 frames, so a 10-token first step's 20 frames give none yet.)"""
    flow, voc = parts
    units = _units(100)  # inside the 100-token window
    whole_mel = flow.offline(units)
    mel, audio, fs, first, first_step = _stream_steps(flow, voc, units, FlowStreamConfig(first_hop_tokens=first_hop), burst=1)
    assert first_step == first_hop + flow.lookahead
    assert (first == first_step) == (2 * first_hop > voc.f0_context + voc.receptive_field)
    assert fs.drift_frames == first_hop * flow.ratio
    tail = first_hop * flow.ratio
    assert np.abs(mel[:, tail:] - whole_mel[:, tail:]).max() <= 1e-4 * np.abs(whole_mel).max()
    head = snr_db(whole_mel[:, :tail].ravel(), mel[:, :tail].ravel())
    print(f"first hop {first_hop}: mel SNR vs whole utterance {head:.1f} dB on its frames")


def test_exact_settings_stay_exact(parts):
    """A first hop that is a whole chunk, or the plain config, changes nothing."""
    flow, voc = parts
    units = _units(100)  # inside the 100-token window
    whole_mel = flow.offline(units)
    for config in (FlowStreamConfig(), FlowStreamConfig(first_hop_tokens=50)):
        mel, _, fs, first = _stream(flow, voc, units, config, burst=1)
        assert fs.exact and fs.drift_frames == 0 and first == 53
        assert np.abs(mel - whole_mel).max() <= 1e-4 * np.abs(whole_mel).max()


def test_fewer_euler_steps_is_an_option_that_drifts(parts):
    flow, _ = parts
    units = _units(60)
    exact = flow.offline(units)
    fs = flow.stream(FlowStreamConfig(n_timesteps=5))
    mel = np.concatenate([fs.push(units), fs.flush()], axis=1)
    assert not fs.exact and mel.shape == exact.shape
    assert 5.0 < snr_db(exact.ravel(), mel.ravel()) < 60.0  # the same spectrogram, not the same numbers
    same = flow.stream(FlowStreamConfig(n_timesteps=flow.n_timesteps))
    same_mel = np.concatenate([same.push(units), same.flush()], axis=1)  # the flow cache: fp32 rounding, not bitwise
    assert np.abs(same_mel - exact).max() <= 1e-4 * np.abs(exact).max() and same.exact


def test_bad_euler_steps_is_one_sentence(parts):
    from omnilite.runtime.errors import OmniliteError

    with pytest.raises(OmniliteError, match=r"^the flow needs at least 1 Euler step, got n_timesteps=0\.$"):
        parts[0].stream(FlowStreamConfig(n_timesteps=0))


def _reply(bundle, question, config):
    """One sequential reply; returns (Done, units written when the first audio chunk came out, the TTS
    LM's thread settings in order)."""
    with Pipeline.load(bundle, config) as pipe:
        calls = []
        set_threads = pipe.tts.lm.set_threads

        def record(n, n_batch=None):
            calls.append((n, n_batch, len(pipe.units.tts_tokens)))
            set_threads(n, n_batch)

        pipe.tts.lm.set_threads = record
        first_units = None
        for e in pipe.respond(question, 16000):
            if isinstance(e, AudioChunk) and first_units is None:
                first_units = len(pipe.units.tts_tokens)
            if isinstance(e, Done):
                return e, first_units, calls


def test_pipeline_first_audio_from_fewer_speech_tokens(omni2_bundle, omni2_reply, question_16k):
    base = dict(max_new_tokens=N_TOKENS, ignore_eos=True, max_tts_tokens=MAX_TTS, mode="sequential")
    fast, fast_first, _ = _reply(omni2_bundle, question_16k, Omni2PipelineConfig(**base))
    slow, slow_first, _ = _reply(omni2_bundle, question_16k, Omni2PipelineConfig(**base, flow=FlowStreamConfig(window_tokens=None),
                                                                             vocoder=VocoderStreamConfig(crossfade=480)))
    # Same tokens and units (the flow schedule is downstream of them).
    assert fast.tokens == slow.tokens == omni2_reply.tokens and fast.units == slow.units == omni2_reply.units
    # W=10 per write: 20 speech tokens cover 17 + 3; the exact schedule needs 60 for 53.
    assert (fast_first, slow_first) == (20, 60)
    # The audio is the default flow stream's mel through HiFT: what the test above measures, but for
    # HiFT's own first seam (a short first lookahead, tests/test_first_audio.py): exact after it.
    b = load_bundle(omni2_bundle)
    flow, voc = FlowDecoder(b), HiFTVocoder(b)
    fs = flow.stream(Omni2PipelineConfig().flow)
    mel = np.concatenate([fs.push(fast.units), fs.flush()], axis=1)
    assert fs.drift_frames == FIRST_HOP_TOKENS * flow.ratio
    offline = voc.offline(mel)
    seam = (2 * FIRST_HOP_TOKENS - voc.f0_context - Omni2PipelineConfig().vocoder.first_lookahead + 1) * voc.hop
    assert len(fast.audio) == len(offline) and snr_db(offline, fast.audio) >= 30.0
    assert np.abs(fast.audio[seam:] - offline[seam:]).max() <= 1e-4 * np.abs(offline).max()
    assert snr_db(voc.offline(flow.offline(slow.units)), slow.audio) >= 60.0


def test_tts_lm_gets_every_core_until_the_first_audio(omni2_bundle, question_16k):
    base = dict(max_new_tokens=N_TOKENS, ignore_eos=True, max_tts_tokens=MAX_TTS, mode="sequential",
                threads=2, stage_threads={"speech_generator": 1})
    on, first, calls = _reply(omni2_bundle, question_16k, Omni2PipelineConfig(**base))
    # Before any speech token: both cores; from the first write after the first audio: its own one.
    assert calls[0] == (2, 2, 0) and calls[1][:2] == (1, 2) and calls[1][2] >= first and len(calls) == 2, calls
    off, _, none = _reply(omni2_bundle, question_16k, Omni2PipelineConfig(**base, phase_threads=False))
    assert none == []
    # Threads change speed, never outputs.
    assert on.tokens == off.tokens and on.units == off.units and np.array_equal(on.audio, off.audio)
