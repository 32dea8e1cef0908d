"""`omnilite chat`: the simulated microphone end to end, the sound-card path with a stand-in
sounddevice module, and one clear sentence when there is no audio device."""

import sys
import threading
import time
import types

import numpy as np
import pytest

from omnilite.cli import main
from omnilite.runtime.audio import read_wav
from omnilite.runtime.audio_io import DeviceAudio

from conftest import DATA, QUESTION

CONVERSATION = DATA / "conversation_2turns_11k.wav"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_chat_with_files_prints_two_replies_and_latency_lines(bundle, tmp_path, capsys):
    out = tmp_path / "out.wav"
    code = main(["chat", str(bundle), "-i", str(CONVERSATION), "-o", str(out),
                 "--pace", "2", "--max-new-tokens", "12", "--ignore-eos"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("you: speaking at") == 2 and printed.count("assistant: ") == 2
    lines = [line for line in printed.splitlines() if line.startswith("[turn ") and "TTFA" in line]
    assert len(lines) == 2 and all("(from end of speech)" in line and "underruns" in line for line in lines)
    assert "2 replies" in printed
    audio, rate = read_wav(out)
    assert rate == 16000 and len(audio) / rate > 9.0 and np.any(audio)


@pytest.fixture()
def no_sounddevice(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # `import sounddevice` raises ImportError


@pytest.mark.parametrize("argv", [["chat", "BUNDLE"], ["chat", "--list-devices"]])
def test_no_audio_device_names_the_file_alternative(bundle, no_sounddevice, capsys, argv):
    argv = [str(bundle) if a == "BUNDLE" else a for a in argv]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "no audio device support" in line and "-i question.wav -o reply.wav" in line


@pytest.mark.parametrize("flag", ["-i", "--input", "--input-file"])  # --input-file: the spelling before -i
def test_input_file_needs_output_file(bundle, capsys, flag):
    assert main(["chat", str(bundle), flag, str(QUESTION)]) == 2
    assert "-i/--input and -o/--output go together" in _error_line(capsys)


def _fake_sounddevice(devices, stream_cls=None):
    class PortAudioError(Exception):
        pass

    def query_devices(device=None, kind=None):
        if kind is None:
            return devices
        usable = [d for d in devices if d[f"max_{kind}_channels"] > 0]
        if not usable:
            raise PortAudioError(f"No {kind} device found")
        return usable[0]

    mod = types.ModuleType("sounddevice")
    mod.PortAudioError = PortAudioError
    mod.query_devices = query_devices
    mod.default = types.SimpleNamespace(device=(0, 0))
    mod.Stream = stream_cls
    mod.CallbackAbort = type("CallbackAbort", (Exception,), {})
    return mod


def test_machine_without_sound_devices(bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice([]))
    assert main(["chat", str(bundle), "--max-new-tokens", "2"]) == 2
    line = _error_line(capsys)
    assert "no usable audio device" in line and "-i question.wav" in line


def test_list_devices(monkeypatch, capsys):
    devs = [{"name": "USB mic", "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": 48000.0},
            {"name": "Speakers", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 44100.0}]
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(devs))
    assert main(["chat", "--list-devices"]) == 0
    printed = capsys.readouterr().out
    assert "USB mic" in printed and "Speakers" in printed


def test_device_callback_runs_the_same_session_step(bundle, monkeypatch, question_16k):
    """A stand-in duplex stream calls the callback from its own thread, as PortAudio does."""
    from omnilite.runtime import Done, Pipeline, PipelineConfig
    from omnilite.runtime.session import Session, SessionConfig

    played = []

    class FakeStream:
        def __init__(self, samplerate, blocksize, device, channels, dtype, callback):
            self.rate, self.block, self.callback = samplerate, blocksize, callback
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="fake-portaudio")

        def _run(self):
            mic = np.concatenate([question_16k, np.zeros(self.rate * 20, np.float32)])
            status = types.SimpleNamespace(output_underflow=False)
            for pos in range(0, len(mic), self.block):
                if self._stop.is_set():
                    return
                indata = mic[pos:pos + self.block, None]
                outdata = np.zeros((self.block, 1), np.float32)
                self.callback(indata, outdata, self.block, None, status)
                played.append(outdata[:, 0].copy())
                time.sleep(self.block / self.rate / 8)

        def start(self):
            self._thread.start()

        def stop(self):
            self._stop.set()
            self._thread.join()

        def close(self):
            pass

    devs = [{"name": "duplex", "max_input_channels": 1, "max_output_channels": 1, "default_samplerate": 16000.0}]
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(devs, FakeStream))
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=10, ignore_eos=True)) as p, \
            Session(p, SessionConfig(vad="silero")) as session:
        device = DeviceAudio(session, block_ms=20)
        device.start()
        done = []
        deadline = time.perf_counter() + 60
        while not done and time.perf_counter() < deadline:
            done = [e for e in session.poll(0.05) if isinstance(e, Done)]
        device.stop()
    assert done and len(done[0].audio) > 0
    assert np.any(np.concatenate(played))  # the reply reached the (fake) speaker


def test_an_error_in_the_sound_card_callback_reaches_the_caller(bundle, monkeypatch):
    from omnilite.runtime import AudioError, Pipeline, PipelineConfig
    from omnilite.runtime.session import Session, SessionConfig

    class OneBlockStream:
        def __init__(self, samplerate, blocksize, device, channels, dtype, callback):
            self.block, self.callback, self.active = blocksize, callback, True

        def start(self):
            indata = np.full((self.block, 1), np.nan, np.float32)  # a broken driver
            try:
                self.callback(indata, np.zeros((self.block, 1), np.float32), self.block, None,
                              types.SimpleNamespace(output_underflow=False))
            except Exception:
                self.active = False  # PortAudio stops the stream on CallbackAbort

        def stop(self):
            pass

        def close(self):
            pass

    devs = [{"name": "duplex", "max_input_channels": 1, "max_output_channels": 1, "default_samplerate": 16000.0}]
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(devs, OneBlockStream))
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=2)) as p, Session(p, SessionConfig(vad="energy")) as s:
        device = DeviceAudio(s)
        device.start()
        assert not device.running
        with pytest.raises(AudioError, match="NaN or infinite"):
            device.wait()
