"""Kaldi-style log-mel filterbank (the features CAM++ speaker embeddings are computed from).

Same defaults as ``torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0)`` used by the
CosyVoice frontend: 25 ms Povey windows every 10 ms (edges snipped), DC removal, pre-emphasis 0.97,
512-point power spectrum, 80 triangular bins on Kaldi's mel scale from 20 Hz to Nyquist, natural log
floored at float32 epsilon.
"""

from __future__ import annotations

import numpy as np


def _mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + f / 700.0)


def mel_banks(n_bins: int = 80, n_fft: int = 512, rate: int = 16000, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    """(n_bins, n_fft // 2 + 1) triangular weights; the Nyquist column is zero, as in Kaldi."""
    high = rate / 2 + high if high <= 0 else high
    lo, hi = _mel(np.float64(low)), _mel(np.float64(high))
    delta = (hi - lo) / (n_bins + 1)
    fft_mel = _mel(np.arange(n_fft // 2) * rate / n_fft)
    banks = np.zeros((n_bins, n_fft // 2 + 1))
    for b in range(n_bins):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        banks[b, : n_fft // 2] = np.maximum(0.0, np.minimum(up, down))
    return banks


def kaldi_fbank(wav: np.ndarray, rate: int = 16000, n_bins: int = 80) -> np.ndarray:
    """(samples,) float waveform -> (frames, n_bins) log filterbank energies."""
    wav = np.asarray(wav, np.float64).reshape(-1)
    size, shift, n_fft = int(0.025 * rate), int(0.010 * rate), 512
    if len(wav) < size:
        raise ValueError(f"the speaker prompt is shorter than one 25 ms frame ({len(wav)} samples)")
    n = 1 + (len(wav) - size) // shift
    idx = np.arange(size)[None, :] + shift * np.arange(n)[:, None]
    frames = wav[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames * window, n=n_fft)) ** 2
    energies = power @ mel_banks(n_bins, n_fft, rate).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)
