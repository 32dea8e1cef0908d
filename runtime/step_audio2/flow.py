"""Step-Audio 2 token2wav flow (torch-free): speech tokens -> 80-bin mel, whole or streamed in chunks.

Two ONNX graphs (exported by export/step_audio2/flow_stage.py), both chunk functions with caches in
and out, so one code path serves a whole utterance (one chunk, empty caches) and streaming:

* ``flow_encoder.onnx``    tokens (1, T) + valid (1, T) + conv/attention caches -> mu (1, 80, 2 (T - 3))
                           and the new caches; the last 3 tokens are lookahead (valid 0: zero padding)
* ``flow_estimator.onnx``  one classifier-free-guided DiT velocity: x, mu, cond (1, 80, T), t (1,),
                           x-vector (1, 192) + conv/attention caches -> v (1, 80, T) and the new caches

The Euler loop (10 cosine-scheduled steps, one estimator cache per step) and the fixed noise
(``flow_noise.npy``; a chunk's noise starts at its first frame, the estimator cache length) are here.
Empty caches are shaped from the graphs' own input shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OmniliteError
from ..onnx_session import SessionOptions, open_session

ENCODER_FILE = "flow_encoder.onnx"
ESTIMATOR_FILE = "flow_estimator.onnx"
NOISE_FILE = "flow_noise.npy"
CHUNK_TOKENS = 25


def t_span(n_timesteps: int) -> np.ndarray:
    t = np.linspace(0, 1, n_timesteps + 1, dtype=np.float32)
    return (1 - np.cos(t * np.float32(0.5 * np.pi))).astype(np.float32)


def stream_schedule(n_tokens: int, chunk: int = CHUNK_TOKENS, lookahead: int = 3) -> list[tuple[int, int, bool]]:
    """(start, end, last) token windows: chunk + lookahead tokens while that many remain, hop chunk;
    the rest is the last window (its lookahead zero-padded)."""
    out, start = [], 0
    while n_tokens - start >= chunk + lookahead:
        out.append((start, start + chunk + lookahead, False))
        start += chunk
    out.append((start, n_tokens, True))
    return out


@dataclass
class FlowState:
    cnn: np.ndarray
    att1: np.ndarray
    att2: np.ndarray
    est_cnn: np.ndarray  # (steps, depth, 2, 2 hidden, 2)
    est_att: np.ndarray  # (steps, depth, 2, heads, frames, 2 head_dim)


class StepAudio2FlowRuntime:
    def __init__(self, stage_dir: Path, n_timesteps: int = 10, lookahead: int = 3,
                 options: SessionOptions = SessionOptions()):
        stage_dir = Path(stage_dir)
        for f in (ENCODER_FILE, ESTIMATOR_FILE, NOISE_FILE):
            if not (stage_dir / f).is_file():
                raise OmniliteError(f"{stage_dir / f} is missing; export the Step-Audio 2 stages again.")
        self.encoder = open_session(stage_dir / ENCODER_FILE, options)
        self.estimator = open_session(stage_dir / ESTIMATOR_FILE, options)
        self.noise = np.load(stage_dir / NOISE_FILE, mmap_mode="r")  # (80, frames)
        self.n_timesteps = n_timesteps
        self.lookahead = lookahead
        self.span = t_span(n_timesteps)

    def _empty(self, session, name: str, lead: tuple[int, ...] = ()) -> np.ndarray:
        shape = next(i.shape for i in session.get_inputs() if i.name == name)
        return np.zeros(lead + tuple(d if isinstance(d, int) else 0 for d in shape), np.float32)

    def empty_state(self) -> FlowState:
        e, s = self.encoder, self.estimator
        return FlowState(self._empty(e, "cnn_cache"), self._empty(e, "att1_cache"), self._empty(e, "att2_cache"),
                         self._empty(s, "cnn_cache", (self.n_timesteps,)), self._empty(s, "att_cache", (self.n_timesteps,)))

    def mu(self, tokens: np.ndarray, last: bool, state: FlowState) -> np.ndarray:
        """Encoder on one window; updates the encoder caches in `state`. Returns mu (1, 80, frames)."""
        tokens = np.asarray(tokens, np.int64).reshape(1, -1)
        valid = np.ones(tokens.shape, np.float32)
        if last:
            tokens = np.concatenate([tokens, np.zeros((1, self.lookahead), np.int64)], axis=1)
            valid = np.concatenate([valid, np.zeros((1, self.lookahead), np.float32)], axis=1)
        mu, state.cnn, state.att1, state.att2 = self.encoder.run(
            None, {"tokens": tokens, "valid": valid, "cnn_cache": state.cnn, "att1_cache": state.att1, "att2_cache": state.att2})
        return mu

    def solve(self, mu: np.ndarray, cond: np.ndarray, xvector: np.ndarray, state: FlowState) -> np.ndarray:
        """Euler ODE over mu's frames from the fixed noise at the estimator cache's length; updates the
        estimator caches (one per step) in `state`."""
        start, n = state.est_att.shape[4], mu.shape[2]
        if start + n > self.noise.shape[1]:
            raise OmniliteError(f"the reply needs {start + n} mel frames but the flow's fixed noise covers "
                                f"{self.noise.shape[1]}; shorten the reply.")
        x = np.array(self.noise[None, :, start:start + n], np.float32)
        span = self.span
        t, dt = span[0], span[1] - span[0]
        cnn, att = [], []
        xv = np.asarray(xvector, np.float32).reshape(1, -1)
        for step in range(1, len(span)):
            v, c, a = self.estimator.run(None, {"x": x, "mu": mu, "t": np.asarray([t], np.float32), "xvector": xv, "cond": cond,
                                                "cnn_cache": state.est_cnn[step - 1], "att_cache": state.est_att[step - 1]})
            x = x + dt * v
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
            cnn.append(c)
            att.append(a)
        state.est_cnn, state.est_att = np.stack(cnn), np.stack(att)
        return x

    def whole(self, tokens, prompt_tokens, prompt_mel: np.ndarray, xvector: np.ndarray) -> np.ndarray:
        """token2wav.py's whole utterance: prompt_mel (2P, 80) conditions the P prompt tokens' frames.
        Returns the generated tokens' mel (80, 2N)."""
        state = self.empty_state()
        mu = self.mu(np.concatenate([np.asarray(prompt_tokens), np.asarray(tokens)]), True, state)
        cond = np.zeros_like(mu)
        cond[0, :, : len(prompt_mel)] = np.asarray(prompt_mel, np.float32).T
        return self.solve(mu, cond, xvector, state)[0, :, len(prompt_mel):]

    def setup(self, prompt_tokens, lookahead, prompt_mel: np.ndarray, xvector: np.ndarray) -> FlowState:
        """Fill the caches with the prompt (its mel as cond); `lookahead`: the 3 tokens after it."""
        state = self.empty_state()
        mu = self.mu(np.concatenate([np.asarray(prompt_tokens), np.asarray(lookahead)]), False, state)
        self.solve(mu, np.asarray(prompt_mel, np.float32).T[None].copy(), xvector, state)
        return state

    def chunk(self, tokens, xvector: np.ndarray, state: FlowState, last: bool) -> np.ndarray:
        """One streaming window (25 + 3 lookahead tokens, or the rest when `last`) -> mel (80, frames)."""
        mu = self.mu(tokens, last, state)
        return self.solve(mu, np.zeros_like(mu), xvector, state)[0]

    def stream(self, tokens, prompt_tokens, prompt_mel: np.ndarray, xvector: np.ndarray,
               prompt_lookahead: bool = False) -> list[np.ndarray]:
        """The streaming loop; returns each window's mel. The prompt's lookahead is the first 3 reply
        tokens (known when the first window is: it waits for 28); ``prompt_lookahead`` uses the prompt's
        own first 3 instead, as the third-party streaming call sites do (measured: NOTES.md)."""
        tokens = np.asarray(tokens)
        la = np.asarray(prompt_tokens)[: self.lookahead] if prompt_lookahead else tokens[: self.lookahead]
        state = self.setup(prompt_tokens, la, prompt_mel, xvector)
        return [self.chunk(tokens[a:b], xvector, state, last) for a, b, last in stream_schedule(len(tokens), lookahead=self.lookahead)]
