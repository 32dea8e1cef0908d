"""CosyVoice2 causal flow matching (torch-free): speech tokens -> 80-bin mel, whole or chunked.

ONNX encoder (tokens -> mu) + ONNX estimator (the vector field, official inputs) + a numpy Euler
solver (10 cosine-spaced steps, classifier-free guidance as a batch of two) started from the
bundle's fixed noise, so the output is deterministic.

Streaming follows the model's own design. Its attention is chunk-causal (a mel frame sees every
frame up to the end of its 2 s chunk) and its convolutions are causal, except the pre-lookahead conv
that reads ``pre_lookahead_len`` (3) tokens ahead. So, like the official streaming calls, each step
runs on the tokens so far plus 3 lookahead tokens, drops the lookahead's frames and emits the frames
since the last step. A shorter hop than the chunk emits frames of a chunk before the chunk's later
tokens exist (earlier audio, slight drift: those frames are not revised).

Attention reaches back to the first frame, so re-solving the whole prefix each step (what the
official calls do) costs O(reply^2): 11 min for a 75 s tiny reply. So each step's estimator sees
only the current chunk and ``left_chunks`` earlier ones (by default as many as make the window
``window_tokens``, 150 tokens = 6 s), the encoder one chunk more of tokens, and the work per second
of audio is flat. Replies up to the window still equal whole-utterance synthesis exactly; later
frames drift (older context is dropped: measured in tests/test_vocoder_cost.py).
``window_tokens=None`` keeps every chunk (exact at any length, quadratic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..errors import OmniliteError
from ..onnx_session import SessionOptions, open_session


DEFAULT_WINDOW_TOKENS = 150  # 6 s: 3 chunks as LLaMA-Omni2 runs the flow, 6 as CosyVoice2 streams
# Token context the encoder gets before the estimator's window, in chunks: the window's first frames
# then get mu from tokens with left context (measured: less drift than 0; 2 gains nothing more).
ENCODER_EXTRA_CHUNKS = 1


@dataclass(frozen=True)
class FlowStreamConfig:
    # The attention chunk in tokens, an inference setting of the same weights: None = the bundle's
    # (50, as LLaMA-Omni2 runs the flow; CosyVoice2's own streaming uses 25). Streaming equals
    # whole-utterance synthesis at the same chunk; a smaller chunk gives earlier audio.
    chunk_tokens: int | None = None
    hop_tokens: int | None = None  # tokens per step; None: the chunk (exact)
    first_hop_tokens: int | None = None  # a shorter first step for earlier first audio; None: hop_tokens
    # The estimator's window per step, in tokens, rounded up to whole chunks; None: every chunk so far
    # (exact at any length, but each step re-solves the whole prefix). Bounded: flat cost per step.
    window_tokens: int | None = DEFAULT_WINDOW_TOKENS
    left_chunks: int | None = None  # earlier chunks in the window, overriding window_tokens when set


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
    """Tokens in (any burst size), mel frames out in order; see the module docstring.

    ``max_window_frames`` / ``max_encoder_tokens``: the most mel frames one estimator pass and the
    most tokens one encoder pass got (bounded by the window, whatever the reply's length)."""

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
        if config.window_tokens is not None and config.window_tokens < 1:
            raise OmniliteError(f"window_tokens must be at least 1 (or None for all), got {config.window_tokens}.")
        self.left_chunks = config.left_chunks
        if self.left_chunks is None and config.window_tokens is not None:
            self.left_chunks = -(-config.window_tokens // self.chunk) - 1
        self._aligned = self.hop % self.chunk == 0 and self.first_hop % self.chunk == 0
        self._windowed = False  # some step dropped earlier chunks
        self.tokens: list[int] = []
        self._tokens_start = 0  # absolute index of self.tokens[0]: older tokens are out of every window
        self._done = 0  # tokens whose frames were emitted
        self.steps = 0
        self.max_window_frames = 0
        self.max_encoder_tokens = 0

    @property
    def exact(self) -> bool:
        """Every frame emitted so far equals whole-utterance synthesis at this chunk."""
        return self._aligned and not self._windowed

    @property
    def _total(self) -> int:
        return self._tokens_start + len(self.tokens)

    def push(self, tokens: list[int]) -> np.ndarray:
        """Add tokens; return the mel frames (80, n) that are ready (possibly none)."""
        self.tokens.extend(int(t) for t in tokens)
        out = []
        while True:
            hop = self.first_hop if self._done == 0 else self.hop
            if self._total < self._done + hop + self.flow.lookahead:
                break
            out.append(self._step(self._done + hop, final=False))
        return np.concatenate(out, axis=1) if out else np.zeros((self.flow.mel_bins, 0), np.float32)

    def flush(self) -> np.ndarray:
        """End of the tokens: the remaining frames (the last ones have no lookahead, as offline)."""
        if self._total <= self._done:
            return np.zeros((self.flow.mel_bins, 0), np.float32)
        return self._step(self._total, final=True)

    def _step(self, end: int, final: bool) -> np.ndarray:
        f = self.flow
        first_chunk = self._done // self.chunk
        win = 0 if self.left_chunks is None else max(0, first_chunk - self.left_chunks) * self.chunk  # tokens
        enc = max(0, win - ENCODER_EXTRA_CHUNKS * self.chunk)  # both on chunk boundaries: same masks
        stop = end if final else end + f.lookahead
        toks = self.tokens[enc - self._tokens_start:stop - self._tokens_start]
        mu = f.mu(toks, self.chunk)[:, (win - enc) * f.ratio:(end - enc) * f.ratio]  # drop the lookahead's frames
        mel = f.solve(mu, win * f.ratio, self.chunk)
        self._windowed = self._windowed or win > 0
        self.max_window_frames = max(self.max_window_frames, mu.shape[1])
        self.max_encoder_tokens = max(self.max_encoder_tokens, len(toks))
        first = self._done * f.ratio
        self._done = end
        self.steps += 1
        if self.left_chunks is not None:  # forget the tokens no later window reaches
            keep = max(0, (end // self.chunk - self.left_chunks - ENCODER_EXTRA_CHUNKS) * self.chunk)
            del self.tokens[:max(0, keep - self._tokens_start)]
            self._tokens_start = max(self._tokens_start, keep)
        return mel[:, first - win * f.ratio:]
