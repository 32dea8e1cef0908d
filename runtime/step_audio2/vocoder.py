"""Step-Audio 2 token2wav, torch-free: speech tokens -> 24 kHz audio, streamed window by window.

The flow windows (25 + 3 lookahead tokens, runtime/step_audio2/flow.py) produce mel that goes straight
into the HiFT stream of runtime/omni2/hift.py (the same graphs and deterministic source as LLaMA-Omni2:
hift.pt is CosyVoice2's HiFT), which vocodes each frame once its receptive field is covered, so the
streamed audio equals the HiFT of the concatenated streamed mel. The official call sites vocode
each window with an 8-frame mel cache and a Hamming crossfade instead (NOTES.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OmniliteError
from ..omni2.hift import HiFTVocoder
from ..onnx_session import SessionOptions
from .flow import StepAudio2FlowRuntime, stream_schedule

CONFIG_FILE = "token2wav.json"
HIFT_F0_FILE = "hift_f0.onnx"
HIFT_FILE = "hift.onnx"


class _StageDir:
    """The two things `HiFTVocoder` asks of a bundle: config sections and stage files."""

    FILES = {"hift_f0": HIFT_F0_FILE, "hift": HIFT_FILE}

    def __init__(self, path: Path):
        self.path = Path(path)
        cfg = self.path / CONFIG_FILE
        if not cfg.is_file():
            raise OmniliteError(f"{cfg} is missing; export the Step-Audio 2 stages again.")
        self.config = json.loads(cfg.read_text())

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    def file(self, stage: str) -> Path:
        return self.path / self.FILES[stage]


class Token2Wav:
    def __init__(self, stage_dir: Path, options: SessionOptions = SessionOptions()):
        stages = _StageDir(stage_dir)
        f = stages["flow"]
        self.chunk_tokens, self.lookahead = int(f["chunk_tokens"]), int(f["pre_lookahead_len"])
        self.flow = StepAudio2FlowRuntime(stage_dir, int(f["n_timesteps"]), self.lookahead, options)
        self.hift = HiFTVocoder(stages, options)  # duck-typed bundle: sections + files

    def stream(self, tokens, prompt_tokens, prompt_mel: np.ndarray, xvector: np.ndarray):
        """Yield audio (float32, 24 kHz) as each window of `tokens` is vocoded; the last item flushes."""
        tokens = np.asarray(tokens)
        state = self.flow.setup(prompt_tokens, tokens[: self.lookahead], prompt_mel, xvector)
        voc = self.hift.stream()
        for a, b, last in stream_schedule(len(tokens), self.chunk_tokens, self.lookahead):
            yield voc.push(self.flow.chunk(tokens[a:b], xvector, state, last))
        yield voc.flush()
