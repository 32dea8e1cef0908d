"""Ring-buffered streaming unit vocoder (duration predictor + unit HiFi-GAN).

Units arrive in bursts. A unit's duration depends on its neighbours within the duration
predictor's receptive field, so it is final once that many later units have arrived. The final
durations expand units into 50 Hz frames. The generator then vocodes the frames [emitted, ready)
with `left_context` frames before them and `lookahead` frames after them (both kept in a ring
buffer, so memory stays flat however long the reply is). When both cover the generator's receptive
field, every sample equals offline vocoding of the whole sequence. With a shorter lookahead (for
lower latency), the last `crossfade` samples of each chunk are held back and cross-faded with the
next chunk's recomputation of them, which hides the seam. `first_lookahead` shortens only the first
chunk's lookahead (the first-audio fast path: the first chunk's last frames are vocoded without all
of their right context, and only that seam is cross-faded); every later chunk is exact again.

The frame-level part is `FrameRing`, which knows nothing about units: any vocoder that maps frames
to hop-spaced samples with a bounded receptive field (a flow model's mel frames into HiFT, say)
streams through it; `VocoderStream` only adds the unit-duration front end.
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
    # Frames of lookahead for the first chunk only; None: `lookahead`. Shorter, the first audio needs
    # that many fewer frames (earlier first sample), at the cost of one cross-faded seam.
    first_lookahead: int | None = None


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


class FrameRing:
    """The ring-buffered streaming mechanism shared by every vocoder type: frames (unit ids for the
    unit HiFi-GAN, mel rows for a flow + HiFT vocoder) in, audio out through `generate(frames)`,
    which maps n frames to n * hop samples with a receptive field of `receptive_field` frames on
    each side. Frames [emitted, ready) are vocoded with `left_context` frames before them and
    `lookahead` after them; only those are kept, so memory does not grow with the reply."""

    def __init__(self, generate, hop: int, receptive_field: int, config: VocoderStreamConfig = VocoderStreamConfig()):
        self.generate, self.hop = generate, hop
        rf = receptive_field
        self.left = rf if config.left_context is None else config.left_context
        self.lookahead = rf if config.lookahead is None else config.lookahead
        self.first_lookahead = self.lookahead if config.first_lookahead is None else min(config.first_lookahead, self.lookahead)
        if self.left < 0 or self.lookahead < 0 or self.first_lookahead < 0:
            raise ValueError(f"left_context and lookahead must be >= 0 frames, got {self.left}, {self.lookahead} "
                             f"(first chunk {config.first_lookahead})")
        self.exact = self.left >= rf and self.lookahead >= rf
        self.crossfade = 0 if self.exact else min(config.crossfade, self.lookahead * hop)
        # Only the first chunk's seam needs the cross-fade when every later chunk is exact.
        self.first_crossfade = self.crossfade if self.first_lookahead >= rf else min(config.crossfade, self.first_lookahead * hop)
        self._frames: np.ndarray | None = None  # the ring: frames still needed, from absolute index _start
        self._start = 0
        self._emitted = 0  # absolute count of frames already turned into audio
        self._tail = np.zeros(0, np.float32)  # held-back samples to cross-fade with the next chunk
        self.max_buffered_frames = 0

    @property
    def _total(self) -> int:
        return self._start + (0 if self._frames is None else len(self._frames))

    def push(self, frames: np.ndarray, final: bool = False) -> np.ndarray:
        """Add frames (possibly none); return the audio that is ready. `final`: nothing follows."""
        frames = np.asarray(frames)
        if len(frames):
            self._frames = frames.copy() if self._frames is None else np.concatenate([self._frames, frames])
        return self._vocode(final)

    def _vocode(self, final: bool) -> np.ndarray:
        ahead = self.first_lookahead if self._emitted == 0 else self.lookahead
        end = self._total if final else self._total - ahead
        if end <= self._emitted:
            return np.zeros(0, np.float32)
        lo = max(self._start, self._emitted - self.left)
        hi = self._total if final else min(self._total, end + ahead)
        frames = self._frames[lo - self._start:hi - self._start]
        self.max_buffered_frames = max(self.max_buffered_frames, len(frames))
        audio = self.generate(frames)
        start, stop = (self._emitted - lo) * self.hop, (end - lo) * self.hop
        chunk = audio[start:stop].astype(np.float32)
        if len(self._tail):
            n = min(len(self._tail), len(chunk))
            ramp = (np.arange(n, dtype=np.float32) + 0.5) / n
            chunk[:n] = self._tail[:n] * (1 - ramp) + chunk[:n] * ramp
        fade = self.first_crossfade if self._emitted == 0 else self.crossfade
        self._tail = np.zeros(0, np.float32) if final else audio[stop:stop + fade].astype(np.float32)
        self._emitted = end
        keep_from = max(0, end - self.left)
        self._frames = self._frames[keep_from - self._start:]
        self._start = keep_from
        return chunk


class VocoderStream:
    """Units -> final durations (a small ring of units as the duration predictor's context) ->
    50 Hz unit frames -> `FrameRing` over the unit HiFi-GAN."""

    def __init__(self, vocoder: UnitVocoder, config: VocoderStreamConfig):
        self.voc = vocoder
        self.ring = FrameRing(vocoder.generate, vocoder.hop, vocoder.receptive_field, config)
        self.left, self.lookahead = self.ring.left, self.ring.lookahead
        self.exact, self.crossfade = self.ring.exact, self.ring.crossfade
        self._units: list[int] = []
        self._units_start = 0
        self._units_timed = 0  # absolute count of units whose duration is final

    @property
    def max_buffered_frames(self) -> int:
        return self.ring.max_buffered_frames

    @property
    def _units_total(self) -> int:
        return self._units_start + len(self._units)

    def push(self, units: list[int]) -> np.ndarray:
        """Add units; return the audio that is ready (possibly empty)."""
        self._units.extend(int(u) for u in units)
        return self.ring.push(self._time_units(final=False))

    def flush(self) -> np.ndarray:
        """End of the reply: time the remaining units and vocode everything left."""
        return self.ring.push(self._time_units(final=True), final=True)

    def _time_units(self, final: bool) -> np.ndarray:
        """Frames of the units whose durations just became final."""
        ctx = self.voc.duration_context
        ready = self._units_total if final else self._units_total - ctx
        if ready <= self._units_timed:
            return np.zeros(0, np.int64)
        lo = max(self._units_start, self._units_timed - ctx)
        window = np.asarray(self._units[lo - self._units_start:], np.int64)
        durations = self.voc.durations(window)
        new = slice(self._units_timed - lo, ready - lo)
        frames = np.repeat(window[new], durations[new])
        self._units_timed = ready
        keep_from = max(0, ready - ctx)  # left context for the next window
        del self._units[: keep_from - self._units_start]
        self._units_start = keep_from
        return frames
