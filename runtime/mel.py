"""Whisper log-mel spectrogram in numpy (same semantics as openai-whisper's torch version).

16 kHz audio, 25 ms Hann window (n_fft 400), 10 ms hop, centred frames with reflect padding,
the last STFT frame dropped, Slaney mel filters, log10 clamped to (max - 8), scaled (x + 4) / 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480000: the window Whisper was trained on
N_FRAMES = N_SAMPLES // HOP  # 3000 mel frames


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mels = f / f_sp
    log_region = f >= min_log_hz
    return np.where(log_region, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank, (n_mels, n_fft // 2 + 1) float32."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]
    return weights.astype(np.float32)


@dataclass(frozen=True)
class LogMel:
    """Computes Whisper log-mel features; `pad_to_30s` reproduces the exact (trained) input."""

    n_mels: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "_filters", mel_filters(self.n_mels).astype(np.float64))
        # Periodic Hann window, as torch.hann_window(400).
        object.__setattr__(self, "_window", 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT))

    def __call__(self, audio: np.ndarray, pad_to_30s: bool = True) -> np.ndarray:
        """audio: mono float32 at 16 kHz -> (n_mels, frames) float32."""
        audio = np.asarray(audio, dtype=np.float64).reshape(-1)
        if pad_to_30s:
            audio = np.pad(audio[:N_SAMPLES], (0, max(0, N_SAMPLES - audio.size)))
        pad = N_FFT // 2
        if audio.size <= pad:  # reflect padding needs more samples than the pad width
            audio = np.pad(audio, (0, pad + 1 - audio.size))
        x = np.pad(audio, (pad, pad), mode="reflect")
        n_frames = 1 + (x.size - N_FFT) // HOP
        frames = np.lib.stride_tricks.as_strided(
            x, shape=(n_frames, N_FFT), strides=(x.strides[0] * HOP, x.strides[0]), writeable=False
        )
        spec = np.fft.rfft(frames * self._window, axis=1)
        power = (spec.real ** 2 + spec.imag ** 2)[:-1]  # Whisper drops the last frame
        mel = self._filters @ power.T
        log_spec = np.log10(np.maximum(mel, 1e-10))
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)
