"""CosyVoice2 causal flow matching (torch-free): speech tokens -> 80-bin mel, whole or chunked.

ONNX encoder (tokens -> mu) + ONNX estimator (the vector field, official inputs) + a numpy Euler
solver (10 cosine-spaced steps, classifier-free guidance as a batch of two) started from the
bundle's fixed noise, so the output is deterministic.

Streaming follows the model's own design. Its attention is chunk-causal (a mel frame sees every
frame up to the end of its 2 s chunk) and its convolutions are causal, except the pre-lookahead conv
that reads ``pre_lookahead_len`` (3) tokens ahead. So, like the official streaming calls, each step
runs on the tokens so far plus 3 lookahead tokens, drops the lookahead's frames and emits the frames
since the last step. With the hop equal to the model's chunk and all left chunks kept, every frame
equals the whole-utterance result. A shorter hop emits frames of a chunk before the chunk's later
tokens exist (earlier audio, slight drift: those frames are not revised); ``left_chunks`` bounds the
estimator's window to the current chunk plus that many earlier ones, so the cost per step stays flat
on long replies (drift again: older context is dropped). The encoder (cheap next to 10 x 2 estimator
passes) re-runs on the token prefix; its per-frame outputs are kept as the window's ``mu``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..errors import OmniliteError
from ..onnx_session import SessionOptions, open_session


@dataclass(frozen=True)
class FlowStreamConfig:
    # The attention chunk in tokens, an inference setting of the same weights: None = the bundle's
    # (50, as LLaMA-Omni2 runs the flow; CosyVoice2's own streaming uses 25). Streaming equals
    # whole-utterance synthesis at the same chunk; a smaller chunk gives earlier audio.
    chunk_tokens: int | None = None
    hop_tokens: int | None = None  # tokens per step; None: the chunk (exact)
    first_hop_tokens: int | None = None  # a shorter first step for earlier first audio; None: hop_tokens
    left_chunks: int | None = None  # earlier chunks the estimator sees; None: all (exact)


class FlowDecoder:
    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["flow"]
        self.encoder = open_session(bundle.file("flow_encoder"), options)
        self.estimator = open_session(bundle.file("flow_estimator"), options)
        self.noise = np.load(bundle.file("flow_noise"), mmap_mode="r")  # (80, frames)
        self.mel_bins = int(cfg["mel_bins"])
        self.ratio = int(cfg["token_mel_ratio"])
        self.lookahead = int(cfg["pre_lookahead_len"])
        self.chunk_tokens = int(cfg["chunk_tokens"])
        self.cfg_rate = np.float32(cfg["inference_cfg_rate"])
        t = np.linspace(0, 1, int(cfg["n_timesteps"]) + 1, dtype=np.float32)
        self.t_span = (1 - np.cos(t * np.float32(0.5 * np.pi))).astype(np.float32) if cfg["t_scheduler"] == "cosine" else t
        self.spks = np.asarray(bundle["speaker"]["spks"], np.float32)

    @property
    def chunk_frames(self) -> int:
        return self.chunk_tokens * self.ratio

    def mu(self, tokens: list[int], chunk_tokens: int | None = None) -> np.ndarray:
        """(T,) tokens -> (80, ratio*T)."""
        chunk = np.asarray(chunk_tokens or self.chunk_tokens, np.int64)
        return self.encoder.run(None, {"tokens": np.asarray(tokens, np.int64)[None], "chunk_tokens": chunk})[0][0]

    def solve(self, mu: np.ndarray, start: int, chunk_tokens: int | None = None) -> np.ndarray:
        """Euler ODE over mel frames [start, start + n) given their mu (80, n)."""
        n = mu.shape[1]
        if start + n > self.noise.shape[1]:
            raise OmniliteError(f"the reply needs {start + n} mel frames but the flow's fixed noise covers "
                                f"{self.noise.shape[1]} (300 s); shorten the reply (max_new_tokens).")
        x = np.array(self.noise[:, start:start + n], np.float32)[None]
        mu_in = np.concatenate([mu[None], np.zeros_like(mu)[None]]).astype(np.float32)
        spks = np.stack([self.spks, np.zeros_like(self.spks)])
        cond = np.zeros((2, self.mel_bins, n), np.float32)
        mask = np.ones((2, 1, n), np.float32)
        r = self.cfg_rate
        chunk = np.asarray((chunk_tokens or self.chunk_tokens) * self.ratio, np.int64)
        for step in range(1, len(self.t_span)):
            t, dt = self.t_span[step - 1], self.t_span[step] - self.t_span[step - 1]
            v = self.estimator.run(None, {"x": np.concatenate([x, x]), "mask": mask, "mu": mu_in,
                                          "t": np.full(2, t, np.float32), "spks": spks, "cond": cond,
                                          "chunk_frames": chunk})[0]
            x = x + dt * ((1 + r) * v[:1] - r * v[1:])
        return x[0]

    def offline(self, tokens: list[int], chunk_tokens: int | None = None) -> np.ndarray:
        """Whole utterance: (80, ratio * len(tokens))."""
        if not tokens:
            return np.zeros((self.mel_bins, 0), np.float32)
        return self.solve(self.mu(tokens, chunk_tokens), 0, chunk_tokens)

    def stream(self, config: FlowStreamConfig = FlowStreamConfig()) -> "FlowStream":
        return FlowStream(self, config)


class FlowStream:
    """Tokens in (any burst size), mel frames out in order; see the module docstring."""

    def __init__(self, flow: FlowDecoder, config: FlowStreamConfig):
        self.flow = flow
        self.chunk = int(config.chunk_tokens or flow.chunk_tokens)
        if self.chunk < 1:
            raise OmniliteError(f"the flow's attention chunk must be at least 1 token, got {self.chunk}.")
        self.hop = int(config.hop_tokens or self.chunk)
        self.first_hop = int(config.first_hop_tokens or self.hop)
        if self.hop < 1 or self.first_hop < 1:
            raise OmniliteError(f"flow hop must be at least 1 token, got {self.hop} (first {self.first_hop}).")
        if config.left_chunks is not None and config.left_chunks < 0:
            raise OmniliteError(f"left_chunks must be >= 0 (or None for all), got {config.left_chunks}.")
        self.left_chunks = config.left_chunks
        self.exact = config.left_chunks is None and self.hop % self.chunk == 0 and self.first_hop % self.chunk == 0
        self.tokens: list[int] = []
        self._done = 0  # tokens whose frames were emitted
        self.steps = 0
        self.max_window_frames = 0

    def push(self, tokens: list[int]) -> np.ndarray:
        """Add tokens; return the mel frames (80, n) that are ready (possibly none)."""
        self.tokens.extend(int(t) for t in tokens)
        out = []
        while True:
            hop = self.first_hop if self._done == 0 else self.hop
            if len(self.tokens) < self._done + hop + self.flow.lookahead:
                break
            out.append(self._step(self._done + hop, final=False))
        return np.concatenate(out, axis=1) if out else np.zeros((self.flow.mel_bins, 0), np.float32)

    def flush(self) -> np.ndarray:
        """End of the tokens: the remaining frames (the last ones have no lookahead, as offline)."""
        if len(self.tokens) <= self._done:
            return np.zeros((self.flow.mel_bins, 0), np.float32)
        return self._step(len(self.tokens), final=True)

    def _step(self, end: int, final: bool) -> np.ndarray:
        f = self.flow
        toks = self.tokens[:end] if final else self.tokens[:end + f.lookahead]
        mu = f.mu(toks, self.chunk)[:, : end * f.ratio]  # drop the lookahead tokens' frames
        first = self._done * f.ratio
        start = 0
        frames = self.chunk * f.ratio
        if self.left_chunks is not None:
            start = max(0, (first // frames - self.left_chunks) * frames)
        mel = f.solve(mu[:, start:], start, self.chunk)
        self.max_window_frames = max(self.max_window_frames, mu.shape[1] - start)
        self._done = end
        self.steps += 1
        return mel[:, first - start:]
