"""HiFT vocoder stage (torch-free): mel frames -> f0 (ONNX) -> NSF source (numpy) -> audio (ONNX).

The source is made here rather than in the graph so that it streams exactly: harmonic phases are
carried in float64 across calls and the noise comes from one seeded generator drawn in sample
order, so a stream of calls equals one whole-utterance call (see export/omni2/hift.py for why the
source is deterministic at all: the official one draws random phases and noise).

Streaming goes through the shared `FrameRing`: each frame is packed as one row (its 80 mel values
followed by its `hop` source samples), and the ring vocodes frames with left context and lookahead
covering the decode graph's receptive field. The f0 predictor needs +-5 frames itself, so a frame
enters the ring only once its f0 is final, like units wait for their durations in the unit vocoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..onnx_session import SessionOptions, open_session
from ..vocoder import FrameRing, VocoderStreamConfig


@dataclass(frozen=True)
class SourceConfig:
    sample_rate: int
    hop: int
    harmonics: int  # fundamental + overtones (9)
    sine_amp: float
    noise_std: float
    voiced_threshold: float


class SourceGenerator:
    """Deterministic NSF excitation: f0 per mel frame -> source samples, continuous across calls.

    Frame f0 is held for ``hop`` samples (nearest upsampling, as official); harmonic k's phase is the
    running sum of k*f0/sr from 0, kept modulo 1 in float64; the noise (strong where unvoiced) is
    PCG64(seed) drawn as (samples, harmonics) rows in order; the harmonics are merged by the
    checkpoint's Linear(9 -> 1) and tanh."""

    def __init__(self, cfg: SourceConfig, weight: np.ndarray, bias: float, seed: int = 0):
        self.cfg = cfg
        self.weight = np.asarray(weight, np.float64).reshape(cfg.harmonics)
        self.bias = float(bias)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self._phase = np.zeros(self.cfg.harmonics, np.float64)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def __call__(self, f0: np.ndarray) -> np.ndarray:
        c = self.cfg
        f0 = np.repeat(np.asarray(f0, np.float64).reshape(-1), c.hop)
        k = np.arange(1, c.harmonics + 1, dtype=np.float64)
        cycles = np.cumsum(f0[:, None] * k[None, :] / c.sample_rate, axis=0) + self._phase[None, :]
        if len(cycles):
            self._phase = np.mod(cycles[-1], 1.0)
        sines = c.sine_amp * np.sin(2 * np.pi * np.mod(cycles, 1.0))
        uv = (f0 > c.voiced_threshold).astype(np.float64)[:, None]
        noise = (uv * c.noise_std + (1 - uv) * c.sine_amp / 3) * self._rng.standard_normal((len(f0), c.harmonics))
        return np.tanh((sines * uv + noise) @ self.weight + self.bias).astype(np.float32)


class HiFTVocoder:
    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["hift"]
        src = cfg["source"]
        self.f0_session = open_session(bundle.file("hift_f0"), options)
        self.session = open_session(bundle.file("hift"), options)
        self.hop = int(cfg["hop"])
        self.sample_rate = int(cfg["sample_rate"])
        self.receptive_field = int(cfg["receptive_field_frames"])
        self.f0_context = int(cfg["f0_receptive_field"])
        self.n_mels = int(bundle["flow"]["mel_bins"])
        self.source_config = SourceConfig(self.sample_rate, self.hop, int(src["harmonics"]), float(src["sine_amp"]),
                                          float(src["noise_std"]), float(src["voiced_threshold"]))
        self._merge = (np.asarray(src["merge_weight"], np.float64), float(src["merge_bias"]), int(src["noise_seed"]))

    def source_generator(self) -> SourceGenerator:
        w, b, seed = self._merge
        return SourceGenerator(self.source_config, w, b, seed)

    def f0(self, mel: np.ndarray) -> np.ndarray:
        """(80, T) -> (T,) Hz."""
        return self.f0_session.run(None, {"mel": np.ascontiguousarray(mel, np.float32)[None]})[0][0]

    def decode(self, mel: np.ndarray, source: np.ndarray) -> np.ndarray:
        """(80, T) mel and (T*hop,) source -> (T*hop,) audio."""
        return self.session.run(None, {"mel": np.ascontiguousarray(mel, np.float32)[None],
                                       "source": np.ascontiguousarray(source, np.float32)[None]})[0][0]

    def offline(self, mel: np.ndarray) -> np.ndarray:
        if mel.shape[1] == 0:
            return np.zeros(0, np.float32)
        return self.decode(mel, self.source_generator()(self.f0(mel)))

    def stream(self, config: VocoderStreamConfig = VocoderStreamConfig(crossfade=480)) -> "HiFTStream":
        return HiFTStream(self, config)


class HiFTStream:
    """Mel frames in (any burst size), audio out, equal to `HiFTVocoder.offline` of the whole mel
    when the ring's context covers the receptive field (the default)."""

    def __init__(self, voc: HiFTVocoder, config: VocoderStreamConfig):
        self.voc = voc
        self.source = voc.source_generator()
        n = voc.n_mels

        def generate(rows: np.ndarray) -> np.ndarray:
            return voc.decode(rows[:, :n].T, rows[:, n:].reshape(-1))

        self.ring = FrameRing(generate, voc.hop, voc.receptive_field, config)
        self._mel = np.zeros((n, 0), np.float32)  # frames kept for the f0 predictor's context
        self._mel_start = 0
        self._f0_done = 0  # absolute count of frames whose f0 (and source) are final

    @property
    def max_buffered_frames(self) -> int:
        return self.ring.max_buffered_frames

    def push(self, mel: np.ndarray) -> np.ndarray:
        """Add mel frames (80, n); return the audio that is ready (possibly empty)."""
        self._mel = np.concatenate([self._mel, np.asarray(mel, np.float32)], axis=1)
        return self.ring.push(self._rows(final=False))

    def flush(self) -> np.ndarray:
        return self.ring.push(self._rows(final=True), final=True)

    def _rows(self, final: bool) -> np.ndarray:
        ctx = self.voc.f0_context
        total = self._mel_start + self._mel.shape[1]
        ready = total if final else total - ctx
        n = self.voc.n_mels
        if ready <= self._f0_done:
            return np.zeros((0, n + self.voc.hop), np.float32)
        lo = max(self._mel_start, self._f0_done - ctx)
        window = self._mel[:, lo - self._mel_start:]
        f0 = self.voc.f0(window)[self._f0_done - lo:ready - lo]
        mel = window[:, self._f0_done - lo:ready - lo]
        src = self.source(f0).reshape(len(f0), self.voc.hop)
        self._f0_done = ready
        keep = max(0, ready - ctx)
        self._mel = self._mel[:, keep - self._mel_start:]
        self._mel_start = keep
        return np.concatenate([mel.T, src], axis=1)
