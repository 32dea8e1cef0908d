"""Step-Audio 2 token2wav, torch-free: speech tokens -> 24 kHz audio, streamed window by window.

The flow windows (25 + 3 lookahead tokens, runtime/step_audio2/flow.py) produce mel that goes straight
into the HiFT stream of runtime/omni2/hift.py (the same graphs and deterministic source as LLaMA-Omni2:
hift.pt is CosyVoice2's HiFT), which vocodes each frame once its receptive field is covered, so the
streamed audio equals the HiFT of the concatenated streamed mel. The official call sites vocode
each window with an 8-frame mel cache and a Hamming crossfade instead (NOTES.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

    @property
    def sample_rate(self) -> int:
        return self.hift.sample_rate

    def open_stream(self, prompt: "VoicePrompt") -> "Token2WavStream":
        """An incremental stream for speech tokens that arrive a few at a time (the pipeline's)."""
        return Token2WavStream(self, prompt)

    def stream(self, tokens, prompt_tokens, prompt_mel: np.ndarray, xvector: np.ndarray):
        """Yield audio (float32, 24 kHz) as each window of `tokens` is vocoded; the last item flushes."""
        tokens = np.asarray(tokens)
        state = self.flow.setup(prompt_tokens, tokens[: self.lookahead], prompt_mel, xvector)
        voc = self.hift.stream()
        for a, b, last in stream_schedule(len(tokens), self.chunk_tokens, self.lookahead):
            yield voc.push(self.flow.chunk(tokens[a:b], xvector, state, last))
        yield voc.flush()


@dataclass(frozen=True)
class VoicePrompt:
    """The flow's prompt conditioning (exported from --speaker-wav): tokens (P,), mel (2P, 80), x-vector (192,)."""

    tokens: np.ndarray
    mel: np.ndarray
    xvector: np.ndarray

    @classmethod
    def load(cls, path: Path) -> "VoicePrompt":
        try:
            with np.load(path) as z:
                prompt = cls(z["prompt_tokens"].astype(np.int64), z["prompt_mel"].astype(np.float32),
                             z["xvector"].astype(np.float32).reshape(-1))
        except (OSError, KeyError, ValueError):
            raise OmniliteError(f"{path} is not a voice prompt (prompt_tokens, prompt_mel, xvector); re-export the "
                                "bundle with `omnilite export --speaker-wav`.") from None
        if prompt.mel.shape != (2 * len(prompt.tokens), 80) or not len(prompt.tokens):
            raise OmniliteError(f"{path} holds {len(prompt.tokens)} prompt tokens and a {prompt.mel.shape} mel, not 2 mel "
                                "frames per token; re-export the bundle with `omnilite export --speaker-wav`.")
        return prompt


class Token2WavStream:
    """Speech tokens in as they are produced, 24 kHz audio out: the same windows as `Token2Wav.stream`
    (25 + 3 lookahead tokens, hop 25; the rest on `flush`), so the audio equals that of the whole token
    list streamed at once. The prompt's lookahead is the reply's first 3 tokens, so the flow starts with
    the first window (28 tokens). A reply with fewer tokens than the lookahead is too short to condition
    the prompt window (under 0.12 s of speech) and gives no audio."""

    def __init__(self, t2w: Token2Wav, prompt: VoicePrompt):
        self.t2w, self.prompt = t2w, prompt
        self.tokens: list[int] = []
        self.start = 0  # the next window's first token
        self.state = None
        self.hift = t2w.hift.stream()

    def _window(self, end: int, last: bool) -> np.ndarray:
        t2w, p = self.t2w, self.prompt
        tokens = np.asarray(self.tokens, np.int64)
        if self.state is None:
            self.state = t2w.flow.setup(p.tokens, tokens[: t2w.lookahead], p.mel, p.xvector)
        return self.hift.push(t2w.flow.chunk(tokens[self.start:end], p.xvector, self.state, last))

    def push(self, tokens: list[int]) -> np.ndarray:
        self.tokens += [int(t) for t in tokens]
        out = []
        step, need = self.t2w.chunk_tokens, self.t2w.chunk_tokens + self.t2w.lookahead
        while len(self.tokens) - self.start >= need:
            out.append(self._window(self.start + need, False))
            self.start += step
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        if len(self.tokens) < self.t2w.lookahead:
            return np.zeros(0, np.float32)
        wav = self._window(len(self.tokens), True)
        self.start = len(self.tokens)
        return np.concatenate([wav, self.hift.flush()])
