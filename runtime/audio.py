"""Audio input/output without heavy dependencies: WAV read/write, mono mix-down, resampling.

WAV is parsed directly (PCM 8/16/24/32-bit, IEEE float 32/64, WAVE_FORMAT_EXTENSIBLE) so that a
corrupt or non-audio file gets one clear sentence instead of a library traceback.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from math import gcd
from pathlib import Path

import numpy as np

from .errors import AudioError

log = logging.getLogger(__name__)

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_UNKNOWN_SIZE = 0xFFFFFFFF
# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a WAV file as float32 of shape (frames, channels) and its sample rate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file; pass the path of a WAV file.") from None
    except OSError as e:
        raise AudioError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions.") from None
    return decode_wav(data, str(path))


def decode_wav(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """`read_wav` for WAV bytes already in memory (e.g. read from stdin); `source` names them in errors."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{source} is not a WAV file (no RIFF/WAVE header); convert it to WAV, e.g. `sox in.mp3 out.wav`.")
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                break
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                break
            # A writer that could not seek back (a pipe) leaves the size at 0xFFFFFFFF: the data runs to the end.
            if len(body) < size and size != _UNKNOWN_SIZE:
                log.warning("%s is cut short: its data chunk lacks %d of %d bytes; using the %d bytes that are there",
                            source, size - len(body), size, len(body))
            return _decode(source, body, *fmt)
        pos += 8 + size + (size & 1)
    raise AudioError(f"{source} is a damaged WAV file (missing fmt or data chunk); re-export the audio as WAV.")


def _decode(source: str, body: bytes, tag: int, channels: int, rate: int, bits: int) -> tuple[np.ndarray, int]:
    if channels < 1 or rate < 1:
        raise AudioError(f"{source} declares {channels} channels at {rate} Hz; re-export the audio as WAV.")
    width = bits // 8
    usable = len(body) - len(body) % (width * channels) if width else 0
    raw = body[:usable]
    if tag == _PCM and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == _PCM and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    elif tag == _FLOAT and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise AudioError(f"{source} uses an unsupported WAV encoding (format {tag}, {bits}-bit); convert it to 16-bit PCM WAV.")
    return x.reshape(-1, channels), rate


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio as 16-bit PCM WAV, atomically (temp file + rename)."""
    atomic_write_bytes(Path(path), wav_bytes(audio, sample_rate))


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio as a 16-bit PCM WAV file's bytes."""
    pcm = (np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0) * 32767.0).round().astype("<i2")
    header = b"RIFF" + struct.pack("<I", 36 + pcm.nbytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, _PCM, 1, sample_rate, sample_rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", pcm.nbytes)
    return header + pcm.tobytes()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32, channels averaged."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        return audio.mean(axis=1, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"audio has shape {audio.shape}; pass a 1-D array or (frames, channels).")
    return audio


def resample(audio: np.ndarray, src_rate: int, dst_rate: int, *, taps_per_side: int = 32) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc (polyphase, exact rational ratio)."""
    audio = np.asarray(audio, dtype=np.float32)
    if src_rate == dst_rate or audio.size == 0:
        return audio
    up, down, k, filters = _polyphase(src_rate, dst_rate, taps_per_side)
    padded = np.pad(audio.astype(np.float64), (taps_per_side, taps_per_side + 1))
    n = np.arange((audio.size * up) // down)
    base = (n * down) // up + taps_per_side
    phase = n % up
    out = np.empty(n.size, dtype=np.float64)
    block = 16384  # bounds the temporary (block x taps) gather
    for s in range(0, n.size, block):
        idx = base[s:s + block, None] + k[None, :]
        out[s:s + block] = np.einsum("ij,ij->i", padded[idx], filters[phase[s:s + block]])
    return out.astype(np.float32)


def _polyphase(src_rate: int, dst_rate: int, taps_per_side: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(up, down, tap offsets, one Kaiser-windowed sinc filter per output phase)."""
    g = gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    cutoff = min(1.0, up / down)  # of the input Nyquist: anti-alias when downsampling
    beta = 8.6
    # Output n sits at input time n*down/up; the fractional part repeats with period `up`,
    # so one filter per phase covers every output sample.
    frac = (np.arange(up) * down % up) / up
    k = np.arange(-taps_per_side + 1, taps_per_side + 1)
    x = k[None, :] - frac[:, None]
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (x / taps_per_side) ** 2, 0.0, 1.0))) / np.i0(beta)
    filters = cutoff * np.sinc(cutoff * x) * window
    return up, down, k, filters


class StreamResampler:
    """`resample` for audio that arrives in blocks (a microphone): the concatenated outputs of
    `push` and `flush` equal `resample` of the whole signal. Each output sample is emitted as soon as
    the input samples under its filter have arrived (taps_per_side input samples of delay), and
    only those are kept, so memory stays flat."""

    def __init__(self, src_rate: int, dst_rate: int, *, taps_per_side: int = 32):
        if src_rate <= 0 or dst_rate <= 0:
            raise AudioError(f"sample rates must be positive, got {src_rate} -> {dst_rate} Hz; pass the rate in Hz.")
        self.src_rate, self.dst_rate = int(src_rate), int(dst_rate)
        self.taps = taps_per_side
        self.up, self.down, self._k, self._filters = _polyphase(self.src_rate, self.dst_rate, taps_per_side)
        self._buf = np.zeros(taps_per_side, np.float64)  # the zeros before input sample 0
        self._buf_start = -taps_per_side  # input index of _buf[0]
        self.received = 0  # input samples pushed so far
        self._next = 0  # index of the next output sample

    def push(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if self.src_rate == self.dst_rate:
            self.received += audio.size
            return audio
        self._buf = np.concatenate([self._buf, audio.astype(np.float64)])
        self.received += audio.size
        # Output n reads inputs up to n*down//up + taps_per_side.
        m = self.received - self.taps
        return self._emit((m * self.up - 1) // self.down + 1 if m > 0 else 0)

    def flush(self) -> np.ndarray:
        """End of input: the remaining outputs, with zeros after the last input sample (as `resample`)."""
        if self.src_rate == self.dst_rate:
            return np.zeros(0, np.float32)
        self._buf = np.concatenate([self._buf, np.zeros(self.taps + 1)])
        return self._emit((self.received * self.up) // self.down)

    def _emit(self, end: int) -> np.ndarray:
        if end <= self._next:
            return np.zeros(0, np.float32)
        n = np.arange(self._next, end)
        idx = ((n * self.down) // self.up)[:, None] + self._k[None, :] - self._buf_start
        out = np.einsum("ij,ij->i", self._buf[idx], self._filters[n % self.up])
        self._next = end
        keep_from = (end * self.down) // self.up - self.taps + 1  # the first input the next output reads
        drop = max(0, keep_from - self._buf_start)
        self._buf = self._buf[drop:]
        self._buf_start += drop
        return out.astype(np.float32)


def prepare_speech(audio: np.ndarray, sample_rate: int, target_rate: int, *, source: str = "audio") -> np.ndarray:
    """Mono float32 at target_rate; refuses empty, non-finite and silent-only input."""
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(f"{source}: sample rate {sample_rate!r} is invalid; pass the rate in Hz, e.g. 16000.")
    mono = to_mono(audio)
    if mono.size == 0:
        raise AudioError(f"{source} is empty; record at least a short spoken question.")
    if not np.isfinite(mono).all():
        raise AudioError(f"{source} contains NaN or infinite samples; check the recording.")
    if float(np.max(np.abs(mono))) < 1e-4:
        raise AudioError(f"{source} is silent (peak below -80 dBFS); check the microphone or the file.")
    return resample(mono, int(sample_rate), target_rate)
