"""The first-audio fast path's two mechanisms besides the flow's first hop (tests/test_first_chunk.py):
the vocoder ring's shorter lookahead for the first chunk only, and the LLM holding back (one text
chunk ahead of the speech generator) until the first audio sample. Neither may change anything but
what it says: the ring only the first seam's samples, the hold-back nothing at all."""

import threading
import time

import numpy as np
import pytest

from omnilite.runtime import AudioChunk, Done, Pipeline, TextDelta
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.omni2.hift import HiFTVocoder
from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig
from omnilite.runtime.streaming import CancelToken, Channel
from omnilite.runtime.vocoder import FrameRing, VocoderStreamConfig

from omni2_fixtures import MAX_TTS, N_TOKENS

HOP, RF = 4, 6


def _conv(frames: np.ndarray) -> np.ndarray:
    """A toy generator with a receptive field of RF frames on each side: n frames -> n * HOP samples."""
    k = np.hanning(2 * RF + 3)[1:-1]
    y = np.convolve(np.pad(frames, RF), k / k.sum(), mode="valid")
    return np.repeat(y, HOP).astype(np.float32)


def _ring_stream(frames: np.ndarray, config: VocoderStreamConfig, bursts: list[int]) -> tuple[np.ndarray, list[int]]:
    ring = FrameRing(_conv, HOP, RF, config)
    out, sizes, a = [], [], 0
    for n in bursts:
        chunk = ring.push(frames[a:a + n])
        a += n
        out.append(chunk)
        sizes.append(len(chunk))
    out.append(ring.push(frames[a:], final=True))
    return np.concatenate(out), sizes


@pytest.mark.parametrize("first", [0, 2, 4])
def test_first_lookahead_changes_only_the_first_seam(first):
    frames = np.random.default_rng(0).standard_normal(80).astype(np.float32)
    offline = _conv(frames)
    exact, exact_sizes = _ring_stream(frames, VocoderStreamConfig(crossfade=8), [12, 20, 20])
    fast, sizes = _ring_stream(frames, VocoderStreamConfig(crossfade=8, first_lookahead=first), [12, 20, 20])
    assert np.abs(exact - offline).max() < 1e-6  # the default ring is exact (lookahead = receptive field)
    # The first chunk: every frame but the `first` lookahead ones is out at once (exact: 12 - RF).
    assert exact_sizes[0] == (12 - RF) * HOP and sizes[0] == (12 - first) * HOP
    seam = (12 - first) * HOP
    fade = min(8, first * HOP)
    # Before the seam: frames whose right context was cut (the last RF - first of the first chunk)
    # differ; after the seam's cross-fade every sample is the offline one again.
    assert np.abs(fast[seam + fade:] - offline[seam + fade:]).max() < 1e-6
    assert np.abs(fast[:(12 - RF - first) * HOP] - offline[:(12 - RF - first) * HOP]).max() < 1e-6
    assert len(fast) == len(offline)
    assert np.abs(fast[:seam] - offline[:seam]).max() > 1e-3  # the cut context shows (the test can fail)


def test_first_lookahead_is_checked():
    with pytest.raises(ValueError, match="must be >= 0 frames"):
        FrameRing(_conv, HOP, RF, VocoderStreamConfig(first_lookahead=-1))


@pytest.fixture(scope="module")
def hift(omni2_bundle):
    return HiFTVocoder(load_bundle(omni2_bundle))


def test_hift_receptive_field_is_measured_not_bounded():
    """The ring holds back HiFT's receptive field at every seam, so the bundle records the measured one
    (15 frames at the released shape: mel 13.1, source 14.3), not the layer-by-layer bound (21)."""
    import torch

    from omnilite.export.omni2.hift import HiFT, HiFTConfig, measured_receptive_field, receptive_field_frames

    torch.manual_seed(0)
    c = HiFTConfig()
    assert measured_receptive_field(HiFT(c).eval()) == 15 < receptive_field_frames(c) == 21


# HiFT on random weights (tiny and real shape, two mel draws), first chunk of 34 frames: SNR of the
# first chunk's audio against offline vocoding by first lookahead (frames), measured 2026-12-01:
# 0: 13.0-13.9 dB, 3: 18.5-19.3, 5: 23.7-24.7, 8: 37.5-40.6, 12: 100.6-109.4 (the measured receptive
# field is 15, so 12 cuts only the field's faint edge).
FIRST_CHUNK_SNR_DB = 30.0


@pytest.mark.parametrize("first_lookahead", [None, 3])
def test_hift_first_lookahead_keeps_the_seam(hift, first_lookahead):
    """The default (8 frames) keeps the first chunk within FIRST_CHUNK_SNR_DB; 3 frames (the injected
    fault: too little right context) must not."""
    mel = np.random.default_rng(2).standard_normal((hift.n_mels, 150)).astype(np.float32) * 0.5 - 4.0
    offline = hift.offline(mel)
    config = Omni2PipelineConfig().vocoder
    assert config.first_lookahead == 8
    if first_lookahead is not None:
        config = VocoderStreamConfig(crossfade=config.crossfade, first_lookahead=first_lookahead)
    hs = hift.stream(config)
    first = hs.push(mel[:, :34])  # a 17-token first flow hop: 34 mel frames
    rest = [hs.push(mel[:, a:a + 50]) for a in range(34, 150, 50)] + [hs.flush()]
    audio = np.concatenate([first] + rest)
    held = hift.f0_context + config.first_lookahead
    assert len(first) == (34 - held) * hift.hop  # exact lookahead would give (34 - 20) frames
    assert len(audio) == len(offline)
    head = snr_db(offline[:len(first)], first)
    whole = snr_db(offline, audio)
    after = len(first) + config.crossfade
    print(f"HiFT first lookahead {config.first_lookahead}: first chunk {head:.1f} dB, reply {whole:.1f} dB")
    assert np.abs(audio[after:] - offline[after:]).max() <= 1e-4 * np.abs(offline).max()  # exact after the seam
    assert (head >= FIRST_CHUNK_SNR_DB) == (first_lookahead is None), head


def test_channel_wait_drained_returns_when_taken_or_stopped():
    token = CancelToken()
    ch: Channel = Channel(4, token, "t")
    ch.put(1)
    stop = threading.Event()
    threading.Timer(0.05, lambda: ch.get()).start()
    t = time.perf_counter()
    ch.wait_drained(stop.is_set)
    assert len(ch) == 0 and time.perf_counter() - t >= 0.04
    ch.put(2)
    threading.Timer(0.05, stop.set).start()
    ch.wait_drained(stop.is_set)  # nobody takes it: returns once `stop` holds
    assert len(ch) == 1


def _reply(bundle, question, priority: bool):
    config = Omni2PipelineConfig(max_new_tokens=N_TOKENS, ignore_eos=True, max_tts_tokens=MAX_TTS,
                                 mode="overlapped", first_audio_priority=priority)
    with Pipeline.load(bundle, config) as pipe:
        events = list(pipe.respond(question, 16000))
    done = [e for e in events if isinstance(e, Done)][0]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    audio = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    return done, text, audio


def test_llm_hold_back_changes_no_output(omni2_bundle, question_16k):
    on = _reply(omni2_bundle, question_16k, True)
    off = _reply(omni2_bundle, question_16k, False)
    assert on[0].tokens == off[0].tokens and on[1] == off[1] and on[0].units == off[0].units
    assert len(on[2]) > 0 and np.array_equal(on[2], off[2])
