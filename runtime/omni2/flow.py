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
first-chunk fast path: 17 tokens, two TTS writes; CosyVoice2's own streaming starts with 25, then 50, 100) is followed
by steps that end on multiples of the hop again (growing to it), so with a chunk-aligned hop only
the first step's frames drift (counted in ``FlowStream.drift_frames``, measured in tests/test_first_chunk.py).

Attention reaches back to the first frame, so re-solving the whole prefix each step (what the
official calls do) costs O(reply^2): 11 min for a 75 s tiny reply. So each step's estimator sees
only the current chunk and ``left_chunks`` earlier ones (by default as many as make the window
``window_tokens``, 100 tokens = 4 s), the encoder one chunk more of tokens, and the work per second
of audio is flat. Replies up to the window still equal whole-utterance synthesis exactly; later
frames drift (older context is dropped: measured in tests/test_vocoder_cost.py).
``window_tokens=None`` keeps every chunk (exact at any length, quadratic).

Flow cache (bundles with ``flow_estimator_cached.onnx``, the bundle's chunk, the trained Euler
steps): the frames of a completed chunk never change when later tokens arrive, so each step solves
only the frames from the start of its first incomplete chunk to its end, given a `FlowCache` of the
completed chunks (per Euler step: every transformer block's normed input, from which the graph
re-projects keys and values, and every causal conv's last 2 inputs). Only frames of chunks complete
at a step's end are appended (a partial chunk is re-solved by the next step, as without the cache).
The window then bounds the cache: at most ``left_chunks`` completed chunks are kept, so the new
frames attend to that many earlier chunks, each of which was itself solved with its own left
context (closer to whole-utterance synthesis than re-solving the window's first chunks with none).
``window_tokens=None`` keeps every chunk: exact at any length, and linear in the reply. The encoder
(mu) runs as without the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..errors import OmniliteError
from ..onnx_session import LazySessions, SessionOptions, open_session


# The first step's tokens in the Omni2 pipeline's default (Omni2PipelineConfig.flow): with the
# 3-token lookahead, the first 20 speech tokens, i.e. two of the release's W=10 writes. CosyVoice2's
# own streaming starts at 25 (token_hop_len in cosyvoice/cli/model.py), which needs a third write
# (~0.3 s more on a 2-core CPU). The price: the first hop's frames are solved without the rest of
# their 50-token chunk, 13.8-14.0 dB mel SNR on them vs 17.2-17.3 at 25 on the tiny random flow
# (tests/test_first_chunk.py; every later frame is exact).
FIRST_HOP_TOKENS = 17
CACHED_ESTIMATOR = "flow_estimator_cached"  # optional stage (newer bundles): the stream's flow cache
# 4 s: the current 50-token chunk and one before it. With the flow cache the window's cost is the
# re-projection of its past frames' keys and values: at the real 0.5B shape (int8, one thread) the
# stream costs 0.63-0.65 s of flow per second of audio at 100 tokens, 0.78 at 150 (6 s), 0.47-0.48
# at 50 (no past chunk), so a 2-core CPU keeps up with the TTS LM and HiFT only at 100 or less
# (turn_latency: wall RTF 0.88-0.94 vs 1.04-1.06 at 150). The price is older context: mel SNR
# against whole-utterance synthesis on random weights (a pessimistic case: near-uniform attention)
# 20.3-22.6 dB at 100, 23.1-26.4 at 150, 15.9-17.2 at 50 (tiny, 480 tokens); at the real shape (int8,
# 250 tokens, after the first hop) 21.8 dB at 100 vs 30.8 at 150
# (benchmarks/results/omni2-flow-cache-0.5B-small-enc8-window.md). FlowStreamConfig(window_tokens=150)
# keeps the longer context where the CPU has the time.
DEFAULT_WINDOW_TOKENS = 100
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
    # Solve only each step's new frames from a flow cache when the bundle has the cached estimator and
    # the stream runs the bundle's chunk with the trained Euler steps (see the module docstring).
    flow_cache: bool = True
    # Store the cache in float16 (half the memory; the graph still gets float32). Not exact: ~1e-3
    # relative on the cached normed inputs, below an int8 estimator's own activation rounding (real
    # shape, int8: the fp16 cache is 47.6 dB from the fp32 one, while int8 itself is ~42 dB from a
    # whole solve: benchmarks/omni2_flow_cache.py). None: float16 when the cached estimator is
    # quantized (its own rounding dominates), float32 when it is fp32 (the exact path).
    cache_fp16: bool | None = None


class FlowDecoder:
    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["flow"]
        self.encoder = open_session(bundle.file("flow_encoder"), options)
        # The two estimators hold the same weights: the one the default stream runs (the cached one when
        # the bundle has it) is opened now, the other on first use (offline synthesis, other chunks).
        self.sessions = LazySessions({name: bundle.file(name) for name in ("flow_estimator", CACHED_ESTIMATOR)
                                      if name in bundle.stages}, options)
        self._cached_precision = bundle.stages[CACHED_ESTIMATOR].precision if CACHED_ESTIMATOR in self.sessions else None
        self.sessions[CACHED_ESTIMATOR if CACHED_ESTIMATOR in self.sessions else "flow_estimator"]
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

    @property
    def estimator(self):
        return self.sessions["flow_estimator"]

    @estimator.setter
    def estimator(self, session) -> None:  # a wrapped session (tests count its inputs)
        self.sessions["flow_estimator"] = session

    @property
    def cached_estimator(self):
        return self.sessions[CACHED_ESTIMATOR]

    @property
    def has_cached_estimator(self) -> bool:
        return CACHED_ESTIMATOR in self.sessions

    def cache_fp16(self, asked: bool | None) -> bool:
        """`FlowStreamConfig.cache_fp16` resolved: None means float16 for a quantized cached estimator."""
        return self._cached_precision not in ("fp32", None) if asked is None else asked

    def solve_cached(self, mu: np.ndarray, start: int, cache: "FlowCache", keep: int, chunk_tokens: int | None = None) -> np.ndarray:
        """`solve` of mel frames [start, start + n) (mu (80, n)) after the frames in `cache` (which must
        end at `start`, a chunk boundary), attending to every cached frame; the first `keep` new frames
        (whole chunks) are appended to the cache. Equals those frames of a whole solve when the cache
        holds every earlier frame."""
        n = mu.shape[1]
        chunk = (chunk_tokens or self.chunk_tokens) * self.ratio
        if cache.end != start or start % chunk or keep % chunk or not 0 <= keep <= n:
            raise OmniliteError(f"a cached flow solve must start at a chunk boundary right after its cache and cache whole "
                                f"chunks: cache ends at frame {cache.end}, start {start}, keep {keep} of {n}, chunk {chunk}.")
        if start + n > self.noise.shape[1]:
            raise OmniliteError(f"the reply needs {start + n} mel frames but the flow's fixed noise covers "
                                f"{self.noise.shape[1]} (300 s); shorten the reply (max_new_tokens).")
        est = self.cached_estimator
        x2 = np.empty((2, self.mel_bins, n), np.float32)  # the batch's two rows hold the same x
        x2[0] = self.noise[:, start:start + n]
        mu_in = np.zeros((2, self.mel_bins, n), np.float32)
        mu_in[0] = mu
        feeds = {"mu": mu_in, "spks": np.stack([self.spks, np.zeros_like(self.spks)]),
                 "cond": np.zeros((2, self.mel_bins, n), np.float32), "x": x2,
                 "chunk_frames": np.asarray(chunk, np.int64), "keep": np.asarray(keep, np.int64)}
        r, t_span = self.cfg_rate, self.t_span
        for step in range(1, len(t_span)):
            t, dt = t_span[step - 1], t_span[step] - t_span[step - 1]
            x2[1] = x2[0]
            feeds["t"] = np.full(2, t, np.float32)
            feeds["past"], feeds["conv_context"] = cache.state(step - 1, est)
            v, new_past, context = est.run(None, feeds)
            cache.append(step - 1, new_past, context)
            x2[0] += dt * ((1 + r) * v[0] - r * v[1])
        cache.end = start + keep
        return x2[0].copy()

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


class FlowCache:
    """What later frames need from the completed chunks' frames [end - frames, end), per Euler step
    (both CFG rows): ``past`` (blocks, 2, frames, width), every transformer block's normed input, and
    ``conv_context`` (2, channels, 2), every causal conv's last 2 inputs before `end`. fp32; at the
    released shape (56 blocks x 256) 1.15 MB per mel frame over the 10 steps, 57 MB per second of audio."""

    def __init__(self, max_frames: int | None = None, dtype=np.float32):
        self.end = 0  # absolute mel frame after the cached ones
        self.max_frames = max_frames  # the window: older frames are evicted as new ones come (None: keep all)
        self.dtype = np.dtype(dtype)  # of the stored normed inputs (float16 halves them; fed as float32)
        self.evicted = 0  # frames evicted (per Euler step)
        self.steps: dict[int, list[np.ndarray]] = {}

    def state(self, step: int, session) -> list[np.ndarray]:
        if step not in self.steps:
            shapes = {i.name: i.shape for i in session.get_inputs()}
            blocks, _, _, width = shapes["past"]
            _, channels, ctx = shapes["conv_context"]
            self.steps[step] = [np.zeros((blocks, 2, 0, width), self.dtype), np.zeros((2, channels, ctx), np.float32)]
        past, context = self.steps[step]
        return [past if past.dtype == np.float32 else past.astype(np.float32), context]

    def append(self, step: int, new_past: np.ndarray, context: np.ndarray) -> None:
        """Add the new frames' normed inputs; beyond `max_frames` the oldest go (one copy for both)."""
        past = self.steps[step][0]
        if new_past.shape[2]:
            drop = 0 if self.max_frames is None else max(0, past.shape[2] + new_past.shape[2] - self.max_frames)
            if step == 0:
                self.evicted += drop
            past = np.concatenate([past[:, :, drop:], new_past[:, :, max(0, drop - past.shape[2]):].astype(self.dtype)], axis=2)
        self.steps[step] = [past, context]

    @property
    def frames(self) -> int:
        return next(iter(self.steps.values()))[0].shape[2] if self.steps else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for s in self.steps.values() for a in s)

    @property
    def bytes_per_frame(self) -> int:
        """Bytes one more cached frame costs (all Euler steps): the cache's bytes per second of audio
        is this x the mel frame rate (50 Hz)."""
        return sum(s[0].shape[0] * s[0].shape[1] * s[0].shape[3] * s[0].itemsize for s in self.steps.values())


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
        self._rounded = False  # some step read float16-rounded cached frames
        self.drift_frames = 0  # emitted frames solved before their chunk's tokens were all there
        self.tokens: list[int] = []
        self._tokens_start = 0  # absolute index of self.tokens[0]: older tokens are out of every window
        self._done = 0  # tokens whose frames were emitted
        self.steps = 0
        self.max_window_frames = 0
        self.max_encoder_tokens = 0
        # The flow cache (module docstring): the bundle's stage, chunk and Euler steps.
        self.cache = (FlowCache(None if self.left_chunks is None else self.left_chunks * self.chunk * flow.ratio,
                                np.float16 if flow.cache_fp16(config.cache_fp16) else np.float32)
                      if config.flow_cache and flow.has_cached_estimator and self.chunk == flow.chunk_tokens
                      and self.t_span is flow.t_span else None)
        self.max_cache_bytes = 0

    @property
    def exact(self) -> bool:
        """Every frame emitted so far equals whole-utterance synthesis at this chunk."""
        return self.drift_frames == 0 and not self._windowed and not self._rounded and self.t_span is self.flow.t_span

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
        if self.cache is not None:  # solve from the first incomplete chunk only; the cache holds the rest
            win = first_chunk * self.chunk
        mu = f.mu(toks, self.chunk)[:, (win - enc) * f.ratio:(end - enc) * f.ratio]  # drop the lookahead's frames
        evicted = 0 if self.cache is None else self.cache.evicted  # dropped before this step: its frames miss them
        if self.cache is None:
            mel = f.solve(mu, win * f.ratio, self.chunk, self.t_span)
        else:
            keep = (end // self.chunk * self.chunk - win) * f.ratio  # the frames of chunks now complete
            self._rounded = self._rounded or (self.cache.dtype != np.float32 and self.cache.frames > 0)
            mel = f.solve_cached(mu, win * f.ratio, self.cache, keep, self.chunk)
            self.max_cache_bytes = max(self.max_cache_bytes, self.cache.nbytes)
        self._windowed = self._windowed or (win > 0 if self.cache is None else enc > 0 or evicted > 0)
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
