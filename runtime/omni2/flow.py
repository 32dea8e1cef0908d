"""CosyVoice2 causal flow matching (torch-free): speech tokens -> 80-bin mel, whole or chunked.

ONNX encoder (tokens -> mu) + ONNX estimator (the vector field, official inputs) + a numpy Euler
solver (10 cosine-spaced steps, classifier-free guidance as a batch of two) started from the
bundle's fixed noise, so the output is deterministic.

Streaming follows the model's own design. Its attention is chunk-causal (a mel frame sees every
frame up to the end of its 2 s chunk) and its convolutions are causal, except the pre-lookahead conv
that reads ``pre_lookahead_len`` (3) tokens ahead. So, like the official streaming calls, each step
runs on the tokens so far plus 3 lookahead tokens, drops the lookahead's frames and emits the frames
since the last step. A shorter hop than the chunk emits frames of a chunk before the chunk's later
tokens exist (earlier audio, slight drift: those frames are not revised). A short *first* hop (the
first-chunk fast path; CosyVoice2's own streaming starts with 25 tokens, then 50, 100) is followed
by steps that end on multiples of the hop again (growing to it), so with a chunk-aligned hop only
the first step's frames drift (counted in ``FlowStream.drift_frames``, measured in tests/test_first_chunk.py).

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


# The first step's tokens in the Omni2 pipeline's default (Omni2PipelineConfig.flow): CosyVoice2's
# streaming hop (token_hop_len 25 in cosyvoice/cli/model.py), half of LLaMA-Omni2's 50-token chunk.
FIRST_HOP_TOKENS = 25
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
    # A shorter first step for earlier first audio (its frames of a partial chunk are not revised);
    # later steps end on multiples of hop_tokens again. None: hop_tokens (exact).
    first_hop_tokens: int | None = None
    # The estimator's window per step, in tokens, rounded up to whole chunks; None: every chunk so far
    # (exact at any length, but each step re-solves the whole prefix). Bounded: flat cost per step.
    window_tokens: int | None = DEFAULT_WINDOW_TOKENS
    left_chunks: int | None = None  # earlier chunks in the window, overriding window_tokens when set
    # Euler steps of the ODE; None: the bundle's (10, as trained). Fewer cost proportionally less but
    # change the mel (drift measured in benchmarks/omni2_speech_cost.py): an option, never a default.
    n_timesteps: int | None = None


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
        self.n_timesteps = int(cfg["n_timesteps"])
        self.t_scheduler = cfg["t_scheduler"]
        self.t_span = self.schedule(self.n_timesteps)
        self.spks = np.asarray(bundle["speaker"]["spks"], np.float32)

    def schedule(self, n_timesteps: int) -> np.ndarray:
        """The ODE's time points (n_timesteps + 1), on the bundle's schedule (cosine as trained)."""
        if n_timesteps < 1:
            raise OmniliteError(f"the flow needs at least 1 Euler step, got n_timesteps={n_timesteps}.")
        t = np.linspace(0, 1, n_timesteps + 1, dtype=np.float32)
        return (1 - np.cos(t * np.float32(0.5 * np.pi))).astype(np.float32) if self.t_scheduler == "cosine" else t

    @property
    def chunk_frames(self) -> int:
        return self.chunk_tokens * self.ratio

    def mu(self, tokens: list[int], chunk_tokens: int | None = None) -> np.ndarray:
        """(T,) tokens -> (80, ratio*T)."""
        chunk = np.asarray(chunk_tokens or self.chunk_tokens, np.int64)
        return self.encoder.run(None, {"tokens": np.asarray(tokens, np.int64)[None], "chunk_tokens": chunk})[0][0]

    def solve(self, mu: np.ndarray, start: int, chunk_tokens: int | None = None,
              t_span: np.ndarray | None = None) -> np.ndarray:
        """Euler ODE over mel frames [start, start + n) given their mu (80, n); classifier-free
        guidance as one estimator batch of two (conditional, unconditional), as the official solver."""
        n = mu.shape[1]
        if start + n > self.noise.shape[1]:
            raise OmniliteError(f"the reply needs {start + n} mel frames but the flow's fixed noise covers "
                                f"{self.noise.shape[1]} (300 s); shorten the reply (max_new_tokens).")
        t_span = self.t_span if t_span is None else t_span
        x2 = np.empty((2, self.mel_bins, n), np.float32)  # the batch's two rows hold the same x
        x2[0] = self.noise[:, start:start + n]
        mu_in = np.zeros((2, self.mel_bins, n), np.float32)
        mu_in[0] = mu
        spks = np.stack([self.spks, np.zeros_like(self.spks)])
        cond = np.zeros((2, self.mel_bins, n), np.float32)  # no prompt speech, as LLaMA-Omni2 runs the flow
        r = self.cfg_rate
        feeds = {"x": x2, "mask": np.ones((2, 1, n), np.float32), "mu": mu_in, "spks": spks, "cond": cond,
                 "chunk_frames": np.asarray((chunk_tokens or self.chunk_tokens) * self.ratio, np.int64)}
        for step in range(1, len(t_span)):
            t, dt = t_span[step - 1], t_span[step] - t_span[step - 1]
            x2[1] = x2[0]
            feeds["t"] = np.full(2, t, np.float32)
            v = self.estimator.run(None, feeds)[0]
            x2[0] += dt * ((1 + r) * v[0] - r * v[1])
        return x2[0].copy()

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
        self.t_span = flow.t_span if config.n_timesteps in (None, flow.n_timesteps) else flow.schedule(config.n_timesteps)
        self._windowed = False  # some step dropped earlier chunks
        self.drift_frames = 0  # emitted frames solved before their chunk's tokens were all there
        self.tokens: list[int] = []
        self._tokens_start = 0  # absolute index of self.tokens[0]: older tokens are out of every window
        self._done = 0  # tokens whose frames were emitted
        self.steps = 0
        self.max_window_frames = 0
        self.max_encoder_tokens = 0

    @property
    def exact(self) -> bool:
        """Every frame emitted so far equals whole-utterance synthesis at this chunk."""
        return self.drift_frames == 0 and not self._windowed and self.t_span is self.flow.t_span

    def _next_end(self) -> int:
        """Where the next step ends: the first hop, then the next multiple of the hop, but at most at
        twice the tokens done so far rounded up to a chunk (so after a short first hop the steps are
        chunk-aligned and grow, 25, 50, 100, 200 with a 50-token chunk, as CosyVoice2's streaming
        doubles its hop: audio keeps coming while a long hop fills)."""
        if self._done == 0:
            return self.first_hop
        ramp = -(-2 * self._done // self.chunk) * self.chunk
        return min((self._done // self.hop + 1) * self.hop, ramp)

    @property
    def _total(self) -> int:
        return self._tokens_start + len(self.tokens)

    def push(self, tokens: list[int]) -> np.ndarray:
        """Add tokens; return the mel frames (80, n) that are ready (possibly none)."""
        self.tokens.extend(int(t) for t in tokens)
        out = []
        while self._total >= self._next_end() + self.flow.lookahead:
            out.append(self._step(self._next_end(), final=False))
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
        mel = f.solve(mu, win * f.ratio, self.chunk, self.t_span)
        self._windowed = self._windowed or win > 0
        if not final and end % self.chunk:  # the end's chunk is incomplete: its frames so far drift
            self.drift_frames += (end - max(self._done, end - end % self.chunk)) * f.ratio
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
