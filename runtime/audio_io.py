"""Microphone and speaker for a `Session`: the sound card through sounddevice, or WAV files at a
real-time pace (a simulated microphone), driven by the same duplex step.

Each step hands one input block to `Session.feed` and takes one output block from
`Session.read_output`, exactly what a full-duplex sound-card callback does. With files, a thread
calls the step every `block_ms / pace` seconds of wall time (pace 1.0 is real time; a larger pace
runs the same loop faster, which tests use), and the output file receives what the speaker would
have played, sample-aligned with the input.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import read_wav, to_mono
from .errors import AudioError, DeviceError
from .session import Session

log = logging.getLogger(__name__)

NO_DEVICE_HINT = ("run against files instead with `omnilite chat BUNDLE -i question.wav -o reply.wav` "
                  "(a simulated microphone at real-time pace)")


def _sounddevice():
    """Import sounddevice, turning each way of not having a sound card into one sentence."""
    try:
        import sounddevice as sd  # noqa: PLC0415 - optional extra, only for live audio
    except ImportError:
        raise DeviceError("no audio device support: the sounddevice package is not installed "
                          f"(pip install 'omnilite[audio]'); {NO_DEVICE_HINT}.") from None
    except OSError:
        raise DeviceError("no audio device support: the PortAudio library is missing (e.g. apt install libportaudio2); "
                          f"{NO_DEVICE_HINT}.") from None
    return sd


def list_devices() -> str:
    """The sound devices PortAudio sees, one per line, with default input/output marked."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default_in, default_out = sd.default.device
    except Exception as e:  # noqa: BLE001 - PortAudio reports host problems with several types
        raise DeviceError(f"cannot list audio devices ({e}); {NO_DEVICE_HINT}.") from None
    lines = []
    for i, d in enumerate(devices):
        mark = ("<" if i == default_in else " ") + (">" if i == default_out else " ")
        lines.append(f"{mark} {i:3d} {d['name']}  ({d['max_input_channels']} in, {d['max_output_channels']} out, "
                     f"{d['default_samplerate']:.0f} Hz)")
    if not lines:
        raise DeviceError(f"no audio devices found; {NO_DEVICE_HINT}.")
    return "\n".join(lines) + "\n(< default input, > default output)"


@dataclass
class LoopStats:
    blocks: int = 0
    late_blocks: int = 0  # steps that started after their deadline (the loop itself fell behind)
    input_seconds: float = 0.0
    output: np.ndarray | None = None  # file mode: everything the speaker played


@dataclass(frozen=True)
class FileLoopConfig:
    block_ms: float = 20.0
    pace: float = 1.0  # 1.0: real time; 4.0: four times faster through the same loop
    tail_s: float = 1.0  # silence fed after the file, at least, so the last turn can end
    max_tail_s: float = 120.0  # ... and at most: a reply that never finishes cannot hang the run


class FileAudio:
    """A simulated microphone (a WAV file, then silence) and a recording speaker."""

    def __init__(self, session: Session, input_file: str | Path, config: FileLoopConfig = FileLoopConfig()):
        if config.pace <= 0 or config.block_ms <= 0:
            raise AudioError(f"pace {config.pace} and block {config.block_ms} ms must be positive; e.g. --pace 1 --block-ms 20.")
        audio, rate = read_wav(input_file)
        self.session, self.config = session, config
        self.input = to_mono(audio)
        if not len(self.input):
            raise AudioError(f"{input_file} is empty; record a conversation into it.")
        self.rate = rate
        self.stats = LoopStats(input_seconds=len(self.input) / rate)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="omnilite-simmic", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop feeding and wait for the loop to leave the session (which the caller closes next)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the loop has finished (input played, replies done, or stopped)."""
        self._thread.join(timeout)
        if self._error is not None and not self._thread.is_alive():
            raise self._error
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self._error = e

    def _run(self) -> None:
        cfg, session = self.config, self.session
        block_s = cfg.block_ms / 1000
        out_rate = session.output_rate
        outputs: list[np.ndarray] = []
        fed = 0  # input samples fed so far
        start = time.perf_counter()
        k = 0
        while not self._stop.is_set():
            k += 1
            in_end = int(round(k * block_s * self.rate))
            block = self.input[fed:in_end] if fed < len(self.input) else np.zeros(0, np.float32)
            if len(block) < in_end - fed:
                block = np.concatenate([block, np.zeros(in_end - fed - len(block), np.float32)])
            fed = in_end
            deadline = start + k * block_s / cfg.pace  # when this block's last sample is "captured"
            now = time.perf_counter()
            if now < deadline:
                time.sleep(deadline - now)
            elif now - deadline > block_s / cfg.pace:
                self.stats.late_blocks += 1
            session.feed(block, self.rate, captured_at=time.perf_counter())
            n_out = int(round(k * block_s * out_rate)) - int(round((k - 1) * block_s * out_rate))
            outputs.append(session.read_output(n_out))
            self.stats.blocks = k
            past = fed / self.rate - self.stats.input_seconds
            if past >= cfg.tail_s and session.idle:
                break
            if past >= cfg.max_tail_s:
                log.warning("the session was still busy %.0f s after the input ended; stopping", cfg.max_tail_s)
                break
        self.stats.output = np.concatenate(outputs) if outputs else np.zeros(0, np.float32)


class DeviceAudio:
    """The sound card: one full-duplex stream whose callback is the same step as `FileAudio`'s."""

    def __init__(self, session: Session, input_device: int | str | None = None, output_device: int | str | None = None,
                 block_ms: float = 20.0):
        sd = _sounddevice()
        self.session = session
        self.stats = LoopStats()
        rate = session.output_rate
        try:
            in_info = sd.query_devices(input_device, "input")
            sd.query_devices(output_device, "output")
        except Exception as e:  # noqa: BLE001 - PortAudio raises ValueError/PortAudioError for absent devices
            raise DeviceError(f"no usable audio device ({e}); choose one from `omnilite chat --list-devices` "
                              f"with --input-device/--output-device, or {NO_DEVICE_HINT}.") from None
        self.output_underflows = 0  # PortAudio's own count: the host wanted audio before the callback gave it
        self._error: BaseException | None = None
        blocksize = int(round(rate * block_ms / 1000))

        def callback(indata, outdata, frames, time_info, status) -> None:
            if status.output_underflow:
                self.output_underflows += 1
            try:
                # The capture rate equals the playback rate on a duplex stream; the session resamples
                # whatever it is to 16 kHz for the VAD and the encoder.
                self.session.feed(indata[:, 0].copy(), rate)
                outdata[:, 0] = self.session.read_output(frames)
            except BaseException as e:  # noqa: BLE001 - PortAudio's thread would swallow it; wait() re-raises
                self._error = e
                outdata.fill(0)
                raise sd.CallbackAbort from None
            self.stats.blocks += 1

        try:
            self._stream = sd.Stream(samplerate=rate, blocksize=blocksize, device=(input_device, output_device),
                                     channels=(1, 1), dtype="float32", callback=callback)
        except Exception as e:  # noqa: BLE001
            raise DeviceError(f"cannot open {in_info.get('name', 'the input device')} for {rate} Hz duplex audio ({e}); "
                              f"pick other devices with --input-device/--output-device, or {NO_DEVICE_HINT}.") from None

    def start(self) -> None:
        self._stream.start()

    @property
    def running(self) -> bool:
        return self._error is None and bool(getattr(self._stream, "active", True))

    def wait(self, timeout: float | None = None) -> bool:
        """Raises what stopped the stream (an error in the callback); True once it has stopped."""
        if self._error is not None:
            raise self._error
        return not self.running

    def stop(self) -> None:
        self._stream.stop()
        self._stream.close()

