"""Voice activity detection on 16 kHz audio, one 32 ms window (512 samples) at a time.

`SileroVAD` runs the Silero VAD ONNX model that the `silero-vad` PyPI package ships, through
onnxruntime. Only the model file is used: importing the package would import torch, so it is
located with importlib without being imported (install it torch-free with
``pip install --no-deps silero-vad``). `EnergyVAD` is the dependency-free fallback: frame level
against an adaptive noise floor. Both return a speech probability per window; `Endpointer` in
`session.py` turns probabilities into turns.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import DeviceError, OmniliteError
from .onnx_session import SessionOptions, open_session

log = logging.getLogger(__name__)

VAD_RATE = 16000
WINDOW = 512  # samples per decision at 16 kHz (32 ms): the window Silero VAD is trained on
_SILERO_CONTEXT = 64  # Silero VAD (v5+) sees the last 64 samples of the previous window too
VAD_KINDS = ("auto", "silero", "energy")


class VAD(Protocol):
    name: str

    def __call__(self, window: np.ndarray) -> float:
        """Speech probability of one WINDOW-sample float32 window at 16 kHz."""

    def reset(self) -> None: ...


def silero_model_path() -> Path | None:
    """The ONNX file shipped in the silero-vad package, found without importing the package."""
    try:
        spec = importlib.util.find_spec("silero_vad")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "silero_vad.onnx"
        if path.is_file():
            return path
    return None


class SileroVAD:
    name = "silero"

    def __init__(self, model: Path | None = None, options: SessionOptions = SessionOptions(intra_op_threads=1)):
        path = model or silero_model_path()
        if path is None:
            raise DeviceError("the Silero VAD model is not installed; run `pip install --no-deps silero-vad` "
                              "(the ONNX file is all omnilite uses) or choose the energy VAD.")
        # One thread: a window costs well under a millisecond, and the mic callback must not
        # compete with the reply stages for cores.
        self.session = open_session(Path(path), options)
        self.path = Path(path)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(_SILERO_CONTEXT, np.float32)

    def __call__(self, window: np.ndarray) -> float:
        x = np.concatenate([self._context, np.asarray(window, np.float32)])[None]
        prob, self._state = self.session.run(None, {"input": x, "state": self._state, "sr": np.array(VAD_RATE, np.int64)})
        self._context = x[0, -_SILERO_CONTEXT:]
        return float(prob.reshape(-1)[0])


@dataclass
class EnergyVAD:
    """Speech where a window's level stands `margin_db` above the running noise floor and above
    `floor_dbfs`; the probability ramps over 6 dB so the endpointer's threshold of 0.5 sits mid-ramp."""

    margin_db: float = 12.0
    floor_dbfs: float = -50.0
    name: str = "energy"

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._noise_db = -70.0

    def __call__(self, window: np.ndarray) -> float:
        rms = float(np.sqrt(np.mean(np.square(window, dtype=np.float64)) + 1e-12))
        level = 20.0 * np.log10(rms)
        # The floor falls fast to quieter windows and rises slowly (about 3 dB/s), so speech
        # does not lift it but a steady louder background eventually does.
        if level < self._noise_db:
            self._noise_db = level
        else:
            self._noise_db += min(level - self._noise_db, 0.1)
        threshold = max(self._noise_db + self.margin_db, self.floor_dbfs)
        return float(np.clip((level - threshold) / 6.0 + 0.5, 0.0, 1.0))


def make_vad(kind: str = "auto", model: Path | None = None) -> VAD:
    """`auto`: Silero VAD if its model is installed, else the energy VAD (logged)."""
    if kind not in VAD_KINDS:
        raise OmniliteError(f"VAD {kind!r} is unknown; use one of: {', '.join(VAD_KINDS)}.")
    if kind == "energy":
        return EnergyVAD()
    if kind == "silero" or model is not None or silero_model_path() is not None:
        return SileroVAD(model)
    log.warning("silero-vad is not installed; using the energy VAD (install it with `pip install --no-deps silero-vad`)")
    return EnergyVAD()
