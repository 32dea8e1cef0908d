"""Ring-buffered streaming unit vocoder (duration predictor + unit HiFi-GAN).

Units arrive in bursts. A unit's duration depends on its neighbours within the duration
predictor's receptive field, so it is final once that many later units have arrived. The final
durations expand units into 50 Hz frames. The generator then vocodes the frames [emitted, ready)
with `left_context` frames before them and `lookahead` frames after them (both kept in a ring
buffer, so memory stays flat however long the reply is). When both cover the generator's receptive
field, every sample equals offline vocoding of the whole sequence. With a shorter lookahead (for
lower latency), the last `crossfade` samples of each chunk are held back and cross-faded with the
next chunk's recomputation of them, which hides the seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .onnx_session import SessionOptions, open_session


@dataclass(frozen=True)
class VocoderStreamConfig:
    left_context: int | None = None  # frames; None: the generator's receptive field
    lookahead: int | None = None  # frames; None: the generator's receptive field
    crossfade: int = 160  # samples (10 ms at 16 kHz); used only where a seam can exist


class UnitVocoder:
    """Offline and streaming synthesis from units; `stream()` gives a fresh streaming state."""

    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["vocoder"]
        self.duration_session = open_session(bundle.file("unit_duration"), options)
        self.generator_session = open_session(bundle.file("vocoder"), options)
        self.hop = int(cfg["hop"])
        self.sample_rate = int(cfg["sample_rate"])
        self.duration_context = int(cfg["duration_receptive_field"])
        self.receptive_field = int(cfg["receptive_field_frames"])

    def durations(self, units: np.ndarray) -> np.ndarray:
        return self.duration_session.run(None, {"units": np.asarray(units, np.int64)[None]})[0][0]

    def generate(self, frame_units: np.ndarray) -> np.ndarray:
        return self.generator_session.run(None, {"frame_units": np.asarray(frame_units, np.int64)[None]})[0][0]

    def offline(self, units: list[int]) -> np.ndarray:
        if not units:
            return np.zeros(0, np.float32)
        u = np.asarray(units, np.int64)
        return self.generate(np.repeat(u, self.durations(u)))

    def stream(self, config: VocoderStreamConfig = VocoderStreamConfig()) -> "VocoderStream":
        return VocoderStream(self, config)


class VocoderStream:
    def __init__(self, vocoder: UnitVocoder, config: VocoderStreamConfig):
        self.voc = vocoder
        rf = vocoder.receptive_field
        self.left = rf if config.left_context is None else config.left_context
        self.lookahead = rf if config.lookahead is None else config.lookahead
        self.exact = self.left >= rf and self.lookahead >= rf
        self.crossfade = 0 if self.exact else min(config.crossfade, self.lookahead * vocoder.hop)
        # Ring buffers: lists trimmed after each step to what later steps still need, with the
        # absolute index of their first element.
        self._units: list[int] = []
        self._units_start = 0
        self._units_timed = 0  # absolute count of units whose duration is final
        self._frames: list[int] = []
        self._frames_start = 0
        self._emitted = 0  # absolute count of frames already turned into audio
        self._tail = np.zeros(0, np.float32)  # held-back samples to cross-fade with the next chunk
        self.max_buffered_frames = 0

    @property
    def _units_total(self) -> int:
        return self._units_start + len(self._units)

    @property
    def _frames_total(self) -> int:
        return self._frames_start + len(self._frames)

    def push(self, units: list[int]) -> np.ndarray:
        """Add units; return the audio that is ready (possibly empty)."""
        self._units.extend(int(u) for u in units)
        self._time_units(final=False)
        return self._vocode(final=False)

    def flush(self) -> np.ndarray:
        """End of the reply: time the remaining units and vocode everything left."""
        self._time_units(final=True)
        return self._vocode(final=True)

    def _time_units(self, final: bool) -> None:
        ctx = self.voc.duration_context
        ready = self._units_total if final else self._units_total - ctx
        if ready <= self._units_timed:
            return
        lo = max(self._units_start, self._units_timed - ctx)
        window = np.asarray(self._units[lo - self._units_start:], np.int64)
        durations = self.voc.durations(window)
        new = slice(self._units_timed - lo, ready - lo)
        self._frames.extend(np.repeat(window[new], durations[new]).tolist())
        self._units_timed = ready
        keep_from = max(0, ready - ctx)  # left context for the next window
        del self._units[: keep_from - self._units_start]
        self._units_start = keep_from

    def _vocode(self, final: bool) -> np.ndarray:
        end = self._frames_total if final else self._frames_total - self.lookahead
        if end <= self._emitted:
            return np.zeros(0, np.float32)
        lo = max(self._frames_start, self._emitted - self.left)
        hi = self._frames_total if final else min(self._frames_total, end + self.lookahead)
        frames = np.asarray(self._frames[lo - self._frames_start:hi - self._frames_start], np.int64)
        self.max_buffered_frames = max(self.max_buffered_frames, len(frames))
        audio = self.voc.generate(frames)
        hop = self.voc.hop
        start, stop = (self._emitted - lo) * hop, (end - lo) * hop
        chunk = audio[start:stop].astype(np.float32)
        if len(self._tail):
            n = min(len(self._tail), len(chunk))
            ramp = (np.arange(n, dtype=np.float32) + 0.5) / n
            chunk[:n] = self._tail[:n] * (1 - ramp) + chunk[:n] * ramp
        self._tail = np.zeros(0, np.float32) if final else audio[stop:stop + self.crossfade].astype(np.float32)
        self._emitted = end
        keep_from = max(0, end - self.left)
        del self._frames[: keep_from - self._frames_start]
        self._frames_start = keep_from
        return chunk
