"""Speech encoder stage: audio -> log-mel (numpy) -> Whisper encoder + adapter (ONNX Runtime).

Encoder modes decide which audio windows the encoder sees. Whisper was trained on 30 s windows,
so `exact` pads every question to 30 s (1500 encoder frames, the parity reference); the fast
modes encode less padding:

    exact          pad/trim to 30 s                                  300 positions, always
    unpadded       the real length only                              one position per 100 ms
    pad-Ns         zero-pad to the next multiple of N s              N*10 positions per started N s
    tail-Ns        the real length plus N s of zeros, so the model   one per 100 ms, plus N*10
                   still sees an end-of-audio region
    blocked-Ns     independent N s windows (block-diagonal attention, N*10 positions per started
                   positions restart in each block): completed       block
                   blocks are encoded while the user is still
                   speaking, only the last one waits for the end of speech
    <mode>+fill    the mode's windows, then the rest of the 30 s     300 positions, as exact
                   window is filled with the encoder's output for
                   padding, computed once and cached

Without `+fill` the adapter/LLM receives fewer speech positions than in exact mode (and its
prefill is shorter); with `+fill` it receives exact mode's 300. Whisper's own decoder falls into
repetition loops when the padding region is missing (see the drift table), which `+fill` avoids
at the cost of the fast mode's encoder work only. All lengths are capped at 30 s (the encoder's
positional table). The ONNX encoder has a dynamic mel length, so every mode runs on any bundle
without re-exporting. A position is `frames_per_position` mel frames (100 ms for Whisper + the
k=5 concat adapter). Drift against exact on real Whisper weights: benchmarks/results/encoder_drift.md.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .errors import BundleError, OmniliteError
from .mel import HOP, LogMel, N_SAMPLES, SAMPLE_RATE
from .onnx_session import SessionOptions, open_session

log = logging.getLogger(__name__)

# The modes the drift benchmark measures and the manifest lists; any mode string that
# `EncoderMode.parse` accepts (e.g. "tail-1.5s+fill") also works at run time.
ENCODER_MODES = ("exact", "unpadded", "pad-5s", "tail-1s", "tail-2s", "blocked-5s",
                 "unpadded+fill", "tail-1s+fill", "tail-2s+fill", "blocked-5s+fill")
# Chosen from the drift table (benchmarks/results/encoder_drift.md): no transcript failure on the
# set and the largest speed-up. `omnilite export` records it as the bundle's default mode.
DEFAULT_FAST_MODE = "tail-2s+fill"
# The log-mel value (after Whisper's (x + 4) / 4 scaling) of the padding that `+fill` stands in
# for. Exact mode's padding sits at each clip's own floor, max - 8 in log10 units, which was
# -0.86..-0.59 on the drift set; transcripts did not change between a per-clip floor and this one.
PADDING_FILL_LEVEL = -0.75

_MODE_RE = re.compile(r"^(pad|tail|blocked)-(\d+(?:\.\d+)?)s$")


@dataclass(frozen=True)
class Window:
    """One encoder input: `length` real samples from `start`, zero-padded to `size` samples
    (None: no padding, the mel ends where the audio ends)."""

    start: int
    length: int
    size: int | None

    @property
    def samples(self) -> int:
        return self.length if self.size is None else self.size


@dataclass(frozen=True)
class EncoderMode:
    kind: str = "exact"  # exact | unpadded | pad | tail | blocked
    seconds: float = 0.0  # pad multiple, tail length or block length
    fill: bool = False  # fill the rest of the 30 s window with the cached padding output

    @classmethod
    def parse(cls, spec: "str | EncoderMode") -> "EncoderMode":
        if isinstance(spec, EncoderMode):
            return spec
        text = str(spec).strip().lower()
        fill = text.endswith("+fill")
        base = text[: -len("+fill")] if fill else text
        if base == "exact" and fill:
            raise OmniliteError("encoder mode 'exact+fill' is just 'exact' (it already encodes the whole 30 s window); use exact.")
        if base in ("exact", "unpadded"):
            return cls(base, 0.0, fill)
        m = _MODE_RE.match(base)
        if not m:
            raise OmniliteError(
                f"encoder mode {spec!r} is unknown; use exact, unpadded, pad-Ns, tail-Ns or blocked-Ns, optionally "
                f"followed by +fill (N in seconds, e.g. {DEFAULT_FAST_MODE})."
            )
        kind, seconds = m.group(1), float(m.group(2))
        # Whole 100 ms steps keep every window a whole number of speech positions.
        if seconds * 10 != round(seconds * 10) or (kind != "tail" and seconds <= 0) or seconds > N_SAMPLES / SAMPLE_RATE:
            raise OmniliteError(f"encoder mode {spec!r} needs N as a multiple of 0.1 s between 0.1 and 30 s; e.g. {kind}-2s.")
        if kind == "blocked" and round(300 / (seconds * 10), 6) % 1:
            # Equal blocks tile the 30 s window exactly, so no block crosses the positional table.
            raise OmniliteError(f"encoder mode {spec!r} needs a block length that divides 30 s (e.g. blocked-5s or blocked-10s).")
        return cls(kind, seconds, fill)

    @property
    def name(self) -> str:
        base = self.kind if self.kind in ("exact", "unpadded") else f"{self.kind}-{self.seconds:g}s"
        return base + ("+fill" if self.fill else "")

    def __str__(self) -> str:
        return self.name

    @property
    def streams(self) -> bool:
        """Whether completed parts can be encoded before the end of speech."""
        return self.kind == "blocked"

    def describe(self) -> str:
        s = f"{self.seconds:g}"
        text = {
            "exact": "pad or trim to 30 s as Whisper was trained (1500 encoder frames); the parity reference; "
                     "the LLM sees 300 speech positions",
            "unpadded": "encode the real length only; the LLM sees one position per 100 ms of audio",
            "pad": f"zero-pad to the next multiple of {s} s; the LLM sees {self.seconds * 10:g} positions per started {s} s",
            "tail": f"the real length plus {s} s of zero padding (an end-of-audio region); the LLM sees one "
                    f"position per 100 ms of audio plus {self.seconds * 10:g}",
            "blocked": f"independent {s} s blocks (block-diagonal attention, positions restart per block; completed "
                       f"blocks encode while the user speaks); the LLM sees {self.seconds * 10:g} positions per started block",
        }[self.kind]
        if self.fill:
            text = (text.split("; the LLM sees")[0] + "; then the rest of the 30 s window is filled with the encoder's "
                    "cached output for padding, so the LLM sees 300 positions, as in exact")
        return text

    def windows(self, n_samples: int, quantum: int = 1600, max_samples: int = N_SAMPLES) -> list[Window]:
        """The encoder windows for `n_samples` of 16 kHz audio. `quantum`: samples per speech position."""
        n = min(n_samples, max_samples)
        step = int(round(self.seconds * SAMPLE_RATE))
        if self.kind == "exact":
            return [Window(0, n, max_samples)]
        if self.kind == "unpadded":
            return [Window(0, n, None)]
        if self.kind == "pad":
            return [Window(0, n, min(max(1, math.ceil(n / step)) * step, max_samples))]
        if self.kind == "tail":
            size = max(quantum, math.ceil((n + step) / quantum) * quantum)
            return [Window(0, n, min(size, max_samples))]
        blocks = max(1, math.ceil(n / step))
        return [Window(i * step, min(step, n - i * step), step) for i in range(blocks)]

    def positions(self, n_samples: int, quantum: int = 1600, max_samples: int = N_SAMPLES) -> int:
        """How many speech positions the LLM receives for `n_samples` of audio (the adapter
        stacks quantum / 320 encoder frames, each covering two 10 ms mel frames)."""
        per_position = quantum // (2 * HOP)
        full = max_samples // quantum
        got = sum(max(1, math.ceil(max(w.samples // HOP, 2 * per_position) / 2) // per_position)
                  for w in self.windows(n_samples, quantum, max_samples))
        return max(got, full) if self.fill else got


def window_audio(audio_16k: np.ndarray, window: Window) -> np.ndarray:
    """The samples one window encodes: its slice of the input, zero-padded to its size."""
    seg = np.asarray(audio_16k, dtype=np.float32)[window.start: window.start + window.length]
    if window.size is not None and window.size > seg.size:
        seg = np.pad(seg, (0, window.size - seg.size))
    return seg


def window_mel(log_mel: LogMel, audio_16k: np.ndarray, window: Window, min_frames: int = 10) -> np.ndarray:
    """(n_mels, frames) log-mel of one window. Zero padding is added before the STFT, as exact
    mode pads to 30 s, so a padded window's frames equal the first frames of exact mode's mel."""
    mel = log_mel(window_audio(audio_16k, window), pad_to_30s=False)
    # Enough frames for one speech position; a shorter clip is padded with the log floor.
    if mel.shape[1] < min_frames:
        mel = np.pad(mel, ((0, 0), (0, min_frames - mel.shape[1])), constant_values=mel.min())
    return mel


def padding_mel(n_mels: int, frames: int) -> np.ndarray:
    """The log-mel of a window of pure padding, at PADDING_FILL_LEVEL: what `+fill` encodes once."""
    return np.full((n_mels, frames), PADDING_FILL_LEVEL, dtype=np.float32)


def fill_window(encoded: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """`encoded` (rows from position 0) continued by the padding encoding's rows up to its length."""
    if len(encoded) >= len(padding):
        return encoded
    return np.concatenate([encoded, padding[len(encoded):].astype(encoded.dtype, copy=False)])


def speech_frames(window: Window) -> int:
    """Encoder frames (20 ms, after the stride-2 conv) that cover the window's real audio."""
    return math.ceil(window.length / (2 * HOP))


@dataclass(frozen=True)
class EncoderInput:
    """What `SpeechEncoder.mel` returns and `SpeechEncoder.embed` takes: one log-mel per window."""

    mels: tuple[np.ndarray, ...]
    mode: EncoderMode

    @property
    def frames(self) -> int:
        return sum(m.shape[1] for m in self.mels)


class SpeechEncoder:
    """Runs the bundle's encoder in any `EncoderMode`; the bundle's manifest names the default."""

    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["encoder"]
        self.bundle = bundle
        self.session = open_session(bundle.file("encoder"), options)
        self.log_mel = LogMel(int(cfg["n_mels"]))
        self.frames_per_position = int(cfg["frames_per_position"])
        self.max_frames = int(cfg["max_mel_frames"])
        # Bundles written before encoder modes existed have no "mode": they ran exact.
        self.default_mode = EncoderMode.parse(cfg.get("mode", "exact"))
        self._padding: np.ndarray | None = None
        self._padding_lock = threading.Lock()

    @property
    def quantum(self) -> int:
        return self.frames_per_position * HOP

    def resolve(self, mode: "str | EncoderMode | None" = None) -> EncoderMode:
        return self.default_mode if mode is None else EncoderMode.parse(mode)

    def _window_mel(self, audio_16k: np.ndarray, window: Window) -> np.ndarray:
        return window_mel(self.log_mel, audio_16k, window, self.frames_per_position)

    def mel(self, audio_16k: np.ndarray, mode: "str | EncoderMode | None" = None) -> EncoderInput:
        """The log-mel of every window the mode encodes (numpy; cheap next to the encoder)."""
        m = self.resolve(mode)
        if np.ndim(audio_16k) != 1:  # a (samples, channels) array would be windowed as a matrix (OOM)
            raise OmniliteError(f"the speech encoder takes 16 kHz mono samples as a 1-D array, got shape "
                                f"{np.shape(audio_16k)}; mix it down first (omnilite.runtime.audio.to_mono).")
        if len(audio_16k) > N_SAMPLES:
            log.warning("audio is %.1f s; the encoder sees only the first 30 s", len(audio_16k) / SAMPLE_RATE)
        windows = m.windows(len(audio_16k), self.quantum, self.max_frames * HOP)
        return EncoderInput(tuple(self._window_mel(audio_16k, w) for w in windows), m)

    def embed(self, mel: "EncoderInput | np.ndarray") -> np.ndarray:
        """EncoderInput, or one (n_mels, frames) log-mel -> (positions, llm_dim) speech embeddings."""
        if isinstance(mel, np.ndarray):
            return self.session.run(None, {"mel": mel[None].astype(np.float32)})[0][0]
        # Independent windows, encoded one after another, positions concatenated.
        out = np.concatenate([self.embed(m) for m in mel.mels])
        return fill_window(out, self.padding_embeddings()) if mel.mode.fill else out

    def __call__(self, audio_16k: np.ndarray, mode: "str | EncoderMode | None" = None) -> np.ndarray:
        return self.embed(self.mel(audio_16k, mode))

    def padding_embeddings(self) -> np.ndarray:
        """(max positions, llm_dim): the encoding of a 30 s window of pure padding, for `+fill`.
        Read from the bundle when the export stored it, else computed once (one exact-mode run)."""
        with self._padding_lock:
            if self._padding is None:
                self._padding = self._load_padding()
            return self._padding

    def _load_padding(self) -> np.ndarray:
        cache = self.bundle["encoder"].get("padding_cache")
        path = self.bundle.path / cache["file"] if cache else None
        if path is not None and not path.exists():
            # e.g. a bundle rewritten by a tool that kept the manifest entry but not the file
            log.warning("%s is missing; computing the encoder padding cache from encoder.onnx instead", path)
            path = None
        if path is not None:
            try:
                padding = np.load(path)
            except (OSError, ValueError):
                raise BundleError(f"{path} cannot be read as a numpy array; re-export the bundle with `omnilite export`.") from None
            want = self.max_frames // self.frames_per_position
            if padding.ndim != 2 or padding.shape[0] != want or float(cache.get("level", PADDING_FILL_LEVEL)) != PADDING_FILL_LEVEL:
                raise BundleError(f"{path} does not hold {want} padding positions at level {PADDING_FILL_LEVEL}; "
                                  "re-export the bundle with this omnilite.")
            return padding.astype(np.float32, copy=False)
        log.info("bundle %s stores no encoder padding cache: encoding 30 s of padding once for '+fill' modes "
                 "(re-export the bundle to store it)", self.bundle.path)
        return self.embed(padding_mel(self.log_mel.n_mels, self.max_frames))

    def stream(self, mode: "str | EncoderMode | None" = None) -> "EncoderStream":
        return EncoderStream(self, self.resolve(mode))


class EncoderStream:
    """Feeds audio as it arrives; in a blocked mode each completed block is encoded at once, so
    after the end of speech only the last block remains. Other modes encode in `finish()`.
    `finish()` returns exactly what `SpeechEncoder(audio, mode)` returns for the audio so far, and
    leaves the stream as it was: more audio may follow (a speculative reply that was dropped)."""

    def __init__(self, encoder: SpeechEncoder, mode: EncoderMode):
        self.encoder = encoder
        self.mode = mode
        self._audio: list[np.ndarray] = []
        self._n = 0
        self._done: list[np.ndarray] = []  # embeddings of completed blocks
        self._encoded = 0  # samples covered by completed blocks

    @property
    def samples(self) -> int:
        return self._n

    @property
    def final(self) -> np.ndarray | None:
        """Embeddings no later audio can change (the completed blocks), or None."""
        return np.concatenate(self._done) if self._done else None

    def push(self, audio_16k: np.ndarray) -> int:
        """Add 16 kHz mono samples; returns how many blocks this call encoded."""
        audio_16k = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
        self._audio.append(audio_16k)
        self._n += audio_16k.size
        if not self.mode.streams:
            return 0
        step = int(round(self.mode.seconds * SAMPLE_RATE))
        encoded = 0
        while self._encoded + step <= min(self._n, self.encoder.max_frames * HOP):
            audio = self._joined()
            self._done.append(self.encoder.embed(self.encoder._window_mel(audio, Window(self._encoded, step, step))))
            self._encoded += step
            encoded += 1
        return encoded

    def _joined(self) -> np.ndarray:
        if len(self._audio) > 1:
            self._audio = [np.concatenate(self._audio)]
        return self._audio[0] if self._audio else np.zeros(0, np.float32)

    def pending(self) -> EncoderInput:
        """The log-mel of every window not encoded yet (all of them outside blocked modes)."""
        audio = self._joined()
        if not self.mode.streams:
            return self.encoder.mel(audio, self.mode)
        windows = self.mode.windows(self._n, self.encoder.quantum, self.encoder.max_frames * HOP)
        return EncoderInput(tuple(self.encoder._window_mel(audio, w) for w in windows[len(self._done):]), self.mode)

    def finish(self, pending: EncoderInput | None = None) -> np.ndarray:
        """All speech embeddings of the audio so far, as the offline call gives them: the completed
        blocks, then `pending` (default: `self.pending()`) encoded now, then the fill."""
        pending = self.pending() if pending is None else pending
        parts = self._done + [self.encoder.embed(m) for m in pending.mels]
        out = np.concatenate(parts)
        return fill_window(out, self.encoder.padding_embeddings()) if self.mode.fill else out
