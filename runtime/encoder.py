"""Speech encoder stage: audio -> log-mel (numpy) -> Whisper encoder + adapter (ONNX Runtime)."""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .errors import OmniliteError
from .mel import LogMel, N_SAMPLES
from .onnx_session import SessionOptions, open_session

ENCODER_MODES = ("exact", "unpadded")


class SpeechEncoder:
    """`exact` pads/trims to 30 s as the model was trained; `unpadded` encodes only the real length."""

    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["encoder"]
        self.session = open_session(bundle.file("encoder"), options)
        self.log_mel = LogMel(int(cfg["n_mels"]))
        self.frames_per_position = int(cfg["frames_per_position"])
        self.max_frames = int(cfg["max_mel_frames"])

    def mel(self, audio_16k: np.ndarray, mode: str = "exact") -> np.ndarray:
        if mode not in ENCODER_MODES:
            raise OmniliteError(f"encoder mode {mode!r} is unknown; use one of: {', '.join(ENCODER_MODES)}.")
        if mode == "unpadded" and len(audio_16k) > N_SAMPLES:
            audio_16k = audio_16k[:N_SAMPLES]
        mel = self.log_mel(audio_16k, pad_to_30s=(mode == "exact"))
        # Enough frames for one speech position; a shorter clip is padded with the log floor.
        if mel.shape[1] < self.frames_per_position:
            mel = np.pad(mel, ((0, 0), (0, self.frames_per_position - mel.shape[1])), constant_values=mel.min())
        return mel

    def embed(self, mel: np.ndarray) -> np.ndarray:
        """(n_mels, frames) -> (positions, llm_dim) speech embeddings."""
        return self.session.run(None, {"mel": mel[None].astype(np.float32)})[0][0]

    def __call__(self, audio_16k: np.ndarray, mode: str = "exact") -> np.ndarray:
        return self.embed(self.mel(audio_16k, mode))
