import struct

import numpy as np
import pytest

from omnilite.runtime.audio import prepare_speech, read_wav, resample, write_wav
from omnilite.runtime.errors import AudioError

from conftest import QUESTION, QUESTION_STEREO_44K


def test_committed_questions_are_real_speech():
    a, rate = read_wav(QUESTION)
    assert rate == 16000 and a.shape[1] == 1 and 2.0 < len(a) / rate < 6.0
    b, rate_b = read_wav(QUESTION_STEREO_44K)
    assert rate_b == 44100 and b.shape[1] == 2


def test_wav_roundtrip_is_atomic_and_16bit(tmp_path):
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    path = tmp_path / "x.wav"
    write_wav(path, x, 16000)
    y, rate = read_wav(path)
    assert rate == 16000 and np.max(np.abs(y[:, 0] - x)) < 1.0 / 32767 + 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]  # no temp file left behind


def _float_wav(path, x, rate, channels=1):
    data = np.asarray(x, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)


def test_float_wav_is_read(tmp_path):
    x = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    _float_wav(tmp_path / "f.wav", x, 22050)
    y, rate = read_wav(tmp_path / "f.wav")
    assert rate == 22050 and np.array_equal(y[:, 0], x)


@pytest.mark.parametrize("src", [8000, 22050, 44100, 48000])
def test_resample_keeps_a_tone(src):
    t = np.arange(src) / src
    y = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), src, 16000)
    assert len(y) == 16000
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    inner = slice(200, -200)  # edges see zero padding
    assert np.max(np.abs(y[inner] - ref[inner])) < 2e-3


def test_resample_removes_content_above_the_new_nyquist():
    src = 48000
    t = np.arange(src) / src
    y = resample(np.sin(2 * np.pi * 12000 * t).astype(np.float32), src, 16000)
    assert np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-2  # 12 kHz cannot exist at 16 kHz


def test_stereo_44k_is_mixed_and_resampled():
    a, rate = read_wav(QUESTION_STEREO_44K)
    y = prepare_speech(a, rate, 16000)
    assert y.ndim == 1 and abs(len(y) - len(a) * 16000 / 44100) <= 1


def test_empty_audio_is_refused():
    with pytest.raises(AudioError, match="is empty"):
        prepare_speech(np.zeros(0, np.float32), 16000, 16000)


def test_silent_audio_is_refused():
    with pytest.raises(AudioError, match="is silent"):
        prepare_speech(np.zeros(16000, np.float32), 16000, 16000)


def test_non_audio_file_is_refused(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is not audio at all")
    with pytest.raises(AudioError, match=r"notes.wav is not a WAV file"):
        read_wav(p)


def test_truncated_wav_is_refused(tmp_path):
    p = tmp_path / "cut.wav"
    p.write_bytes(QUESTION.read_bytes()[:30])
    with pytest.raises(AudioError, match="damaged WAV"):
        read_wav(p)
