"""The LLaMA-Omni2 speech side's work per second of audio is flat in the reply's length: every ONNX
pass of the streaming flow and HiFT gets a bounded number of positions, however long the reply.
Counted on the graphs' inputs (never timed). The flow's attention reaches back to the first frame,
so the bound costs exactness after the window (100 tokens, 4 s): the drift is measured here too."""

import numpy as np
import pytest

from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.omni2.flow import DEFAULT_WINDOW_TOKENS, ENCODER_EXTRA_CHUNKS, FlowDecoder, FlowStreamConfig
from omnilite.runtime.omni2.hift import HiFTVocoder

CHUNK = 5  # tokens: an inference setting of the same weights; small, so a long reply is many steps
WINDOW = 15  # tokens: 3 chunks


class _Counting:
    """An onnxruntime session that records the length of one input's last axis on every run."""

    def __init__(self, session, name: str):
        self.session, self.name, self.lengths = session, name, []

    def run(self, outputs, feeds):
        self.lengths.append(feeds[self.name].shape[-1])
        return self.session.run(outputs, feeds)


@pytest.fixture(scope="module")
def parts(omni2_bundle):
    b = load_bundle(omni2_bundle)
    return FlowDecoder(b), HiFTVocoder(b)


def _stream(flow: FlowDecoder, voc: HiFTVocoder, units: list[int], config: FlowStreamConfig):
    """Units 10 at a time as the R/W loop writes them; returns (mel, audio, counters, flow stream)."""
    counters = {"encoder": _Counting(flow.encoder, "tokens"), "estimator": _Counting(flow.estimator, "x"),
                "f0": _Counting(voc.f0_session, "mel"), "hift": _Counting(voc.session, "mel")}
    saved = flow.encoder, flow.estimator, voc.f0_session, voc.session
    flow.encoder, flow.estimator, voc.f0_session, voc.session = (counters[k] for k in ("encoder", "estimator", "f0", "hift"))
    try:
        fs, hs = flow.stream(config), voc.stream()
        mels, audio = [], []
        for a in range(0, len(units), 10):
            mels.append(fs.push(units[a:a + 10]))
            audio.append(hs.push(mels[-1]))
        mels.append(fs.flush())
        audio += [hs.push(mels[-1]), hs.flush()]
    finally:
        flow.encoder, flow.estimator, voc.f0_session, voc.session = saved
    return np.concatenate(mels, axis=1), np.concatenate(audio), counters, fs


def _units(n: int) -> list[int]:
    return np.random.default_rng(0).integers(0, 6561, n).tolist()


def test_every_pass_sees_a_bounded_window_whatever_the_reply_length(parts):
    flow, voc = parts
    r, la = flow.ratio, flow.lookahead
    steps = {}
    for n in (60, 600):  # 12 and 120 chunks: 10x the reply
        _, audio, c, fs = _stream(flow, voc, _units(n), FlowStreamConfig(chunk_tokens=CHUNK, window_tokens=WINDOW))
        assert len(audio) == n * r * voc.hop
        # The estimator: the window's frames (10 Euler steps x CFG batch of them).
        assert fs.left_chunks == 2 and max(c["estimator"].lengths) == fs.max_window_frames == WINDOW * r
        # The encoder: one chunk more of tokens, plus the lookahead.
        assert max(c["encoder"].lengths) == fs.max_encoder_tokens == WINDOW + ENCODER_EXTRA_CHUNKS * CHUNK + la
        # HiFT: each push of mel (at most 2 flow steps here) plus the ring's context on both sides.
        assert max(c["hift"].lengths) <= 2 * CHUNK * r + 2 * voc.receptive_field
        assert max(c["f0"].lengths) <= 2 * CHUNK * r + 2 * voc.f0_context
        assert len(fs.tokens) <= WINDOW + ENCODER_EXTRA_CHUNKS * CHUNK + 10 + la  # the token ring
        steps[n] = (len(c["estimator"].lengths), sum(c["estimator"].lengths), sum(c["hift"].lengths))
    # Total work is linear in the reply: 10x the units, about 10x the frames through every graph.
    calls, est_frames, hift_frames = (steps[600][i] / steps[60][i] for i in range(3))
    assert calls == pytest.approx(10, rel=0.1) and est_frames < 11.5 and hift_frames < 11.5, steps


def test_unbounded_window_is_exact_and_grows_with_the_reply(parts):
    """What the bound replaces: the whole prefix re-solved every step (quadratic in the reply)."""
    flow, voc = parts
    n = 120
    mel, _, c, fs = _stream(flow, voc, _units(n), FlowStreamConfig(chunk_tokens=CHUNK, window_tokens=None))
    assert fs.exact and max(c["estimator"].lengths) == n * flow.ratio and max(c["encoder"].lengths) == n
    whole = flow.offline(_units(n), chunk_tokens=CHUNK)
    assert np.abs(mel - whole).max() <= 1e-4 * np.abs(whole).max()


def test_bounded_window_drift_against_whole_utterance(parts):
    """Frames of the first window (4 s) equal whole-utterance synthesis; later frames lose the
    older context. Measured on the tiny random-weight flow, whose attention is near uniform so every
    dropped frame matters (a trained flow's drift is not measured: no checkpoint here): mel SNR 21.9 dB
    at the bundle's 50-token chunk with a 150-token window, 20.9 dB with the default 100 (2026-12-01)."""
    flow, voc = parts
    units = _units(400)  # 16 s, 8 chunks
    mel, audio, _, fs = _stream(flow, voc, units, FlowStreamConfig())
    whole = flow.offline(units)
    exact = DEFAULT_WINDOW_TOKENS * flow.ratio
    assert fs.left_chunks == 1
    assert not fs.exact and mel.shape == whole.shape
    assert np.abs(mel[:, :exact] - whole[:, :exact]).max() <= 1e-4 * np.abs(whole).max()
    drift = snr_db(whole.ravel(), mel.ravel())
    print(f"bounded flow ({DEFAULT_WINDOW_TOKENS}-token window) vs whole utterance: mel SNR {drift:.1f} dB")
    assert 15.0 <= drift < 60.0  # drifts (it is not exact), but stays the same spectrogram
    # HiFT itself streams exactly through its ring: equal to offline HiFT on the same mel.
    assert snr_db(voc.offline(mel), audio) >= 60.0


def test_bad_window_is_one_sentence(parts):
    from omnilite.runtime.errors import OmniliteError

    with pytest.raises(OmniliteError, match=r"^window_tokens must be at least 1 \(or None for all\), got 0\.$"):
        parts[0].stream(FlowStreamConfig(window_tokens=0))


def test_output_changing_cuts_are_options_with_counted_savings(parts):
    """What the flow's per-second cost options save, counted in estimator frames: half the Euler
    steps halve them; a hop of two chunks re-solves the window's left context half as often. Both
    change the mel (drift measured in benchmarks/omni2_speech_cost.py), so neither is a default."""
    flow, voc = parts
    units = _units(120)
    work = {}
    for name, cfg in {"default": FlowStreamConfig(chunk_tokens=CHUNK, window_tokens=WINDOW),
                      "5 steps": FlowStreamConfig(chunk_tokens=CHUNK, window_tokens=WINDOW, n_timesteps=5),
                      "hop 2 chunks": FlowStreamConfig(chunk_tokens=CHUNK, window_tokens=WINDOW, hop_tokens=2 * CHUNK)}.items():
        mel, _, c, fs = _stream(flow, voc, units, cfg)
        assert mel.shape[1] == len(units) * flow.ratio
        work[name] = (sum(c["estimator"].lengths), fs.exact)
    assert work["5 steps"][0] * 2 == work["default"][0] and not work["5 steps"][1]
    # Window 3 chunks: a 1-chunk hop solves up to 3 chunks per chunk emitted, a 2-chunk hop up to 2.
    assert work["hop 2 chunks"][0] < 0.8 * work["default"][0], work
