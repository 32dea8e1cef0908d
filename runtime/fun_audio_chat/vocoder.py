"""Fun-Audio-Chat's vocoder at run time: the CosyVoice3 flow + causal HiFT stages exported by
``export/fun_audio_chat/vocoder_stage.py``, driven with numpy + onnxruntime (no torch).

`OnnxVocoder` reads ``vocoder.json`` (settings, speaker vector, stage files) from a folder (a bundle);
`VocoderStream` turns speech codes arriving in any burst size into audio as the official streaming
token2wav does: a call per `hop` tokens once `lookahead` more exist, each re-solving every token so
far and keeping the mel frames from its offset; HiFT re-runs over the mel so far and only the new
samples are kept. With chunk attention and a hop of whole chunks (the chunk-aligned schedule) and a
bundle holding ``flow_estimator_cached.onnx``, a call solves only its new frames from a `FlowCache`
(the earlier frames' keys / values per Euler step and layer, the position convs' last inputs): the
frames of finished chunks never attend to later ones, so this is the same output at a cost per call
independent of the reply's length. `Schedule` names the two streaming schedules the pipeline offers (NOTES.md,
"Runtime"): the official web demo's (hop 15 + 3, full attention) and the chunk-aligned one (hop 25
+ 3, 50-frame chunk attention, CosyVoice3's own), whose streamed output equals its whole-utterance
output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OmniliteError
from ..onnx_session import LazySessions, SessionOptions, open_session

RECORD_FILE = "vocoder.json"
STAGE_FILES = (("flow_encoder", "flow_encoder.onnx"), ("flow_estimator", "flow_estimator.onnx"), ("flow_noise", "flow_noise.npy"),
               ("hift_f0", "hift_f0.onnx"), ("hift", "hift.onnx"))
CACHED_ESTIMATOR_STAGE = ("flow_estimator_cached", "flow_estimator_cached.onnx")  # optional (newer bundles)
SOURCE_NOISE_SEED = 0
# The web demo bounds each call's work (utils/constant.py MAX_TTS_TOKENS, MAX_TTS_HISTORY): the flow's
# tokens restart every 200 (8 s), and the HiFT cache once 500 tokens have been cut that way.
WEB_DEMO_FLOW_WINDOW = 200
WEB_DEMO_HIFT_RESTART = 500
# Mel frames before the first new sample that a cached stream's HiFT call re-reads: the causal HiFT's
# left receptive field (conv_pre none, upsampling and resblock convs, source STFT + down convs, iSTFT)
# is 29 frames (22 through the mel, 29 through the source; measured by perturbation in
# tests/test_fun_audio_chat_vocoder_cache.py); past it a window's zero padding no longer reaches the samples kept.
HIFT_CONTEXT_FRAMES = 64


@dataclass(frozen=True)
class SourceParams:
    sample_rate: int
    hop: int  # samples per mel frame (480)
    harmonics: int  # fundamental + overtones (9)
    sine_amp: float
    noise_std: float
    voiced_threshold: float


class CausalSource:
    """``SineGen2(causal=True)`` + ``SourceModuleHnNSF``'s merge: f0 per mel frame -> excitation.

    Official maths: per-sample radians (k*f0/sr) mod 1 are linearly resampled to one value per frame
    (the frame's own, since it is constant over the frame), summed over frames, x 2*pi*hop, and held
    for the frame's samples ("nearest"): each harmonic is a staircase whose phase advances k*f0*hop/sr
    cycles per frame. The harmonic start phases are random officially but land on sample 0 only,
    which the frame resampling never reads, so they have no effect. Noise = amplitude (noise_std
    voiced, sine_amp/3 unvoiced) x a fixed uniform [0, 1) buffer indexed by absolute sample: the
    official buffer is drawn from torch's global generator at construction; ours is PCG64(seed) in
    (sample, harmonic) order, reproducible without torch. Phase sums run in float64.
    """

    def __init__(self, p: SourceParams, weight: np.ndarray, bias: float, seed: int = SOURCE_NOISE_SEED):
        self.p = p
        self.weight = np.asarray(weight, np.float64).reshape(p.harmonics)
        self.bias = float(bias)
        self.seed = seed

    def uniform(self, start: int, n: int) -> np.ndarray:
        """The noise buffer's rows [start, start + n), (n, harmonics)."""
        bits = np.random.PCG64(self.seed)
        bits.advance(start * self.p.harmonics)  # one 64-bit draw per double
        return np.random.Generator(bits).random((n, self.p.harmonics))

    def __call__(self, f0: np.ndarray) -> np.ndarray:
        """f0 (T,) Hz for frames 0..T-1 -> source (T * hop,) float32."""
        return self.segment(f0)[0]

    def segment(self, f0: np.ndarray, start: int = 0, cycles: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The source of frames start .. start + T - 1 from their f0 and `cycles`, the phase sum
        (harmonics,) after frame start - 1 (the last value this returned; None at frame 0). Returns the
        samples and the phase sum after the last frame: consecutive segments equal one call (the sum
        runs on from the carried value in the same order)."""
        p = self.p
        f0 = np.asarray(f0, np.float64).reshape(-1)
        k = np.arange(1, p.harmonics + 1, dtype=np.float64)
        step = np.mod(f0[:, None] * k[None] / p.sample_rate, 1.0) * p.hop
        carry = np.zeros(p.harmonics) if cycles is None else np.asarray(cycles, np.float64)
        if cycles is None:
            cycles = np.cumsum(step, axis=0)
        else:
            cycles = np.cumsum(np.concatenate([carry[None], step]), axis=0)[1:]
        sines = np.repeat(p.sine_amp * np.sin(2 * np.pi * np.mod(cycles, 1.0)), p.hop, axis=0)
        uv = np.repeat((f0 > p.voiced_threshold).astype(np.float64), p.hop)[:, None]
        noise = (uv * p.noise_std + (1 - uv) * p.sine_amp / 3) * self.uniform(start * p.hop, len(sines))
        last = cycles[-1] if len(cycles) else carry
        return np.tanh((sines * uv + noise) @ self.weight + self.bias).astype(np.float32), last


class OnnxVocoder:
    """The exported stages of `out_dir`, driven with numpy: tokens -> mel -> audio."""

    def __init__(self, folder: str | Path, options: SessionOptions = SessionOptions()):
        folder = Path(folder)
        record = folder / RECORD_FILE
        if not record.exists():
            raise OmniliteError(f"{record} is missing; export the vocoder stages into {folder} first.")
        cfg = json.loads(record.read_text())
        files = {s["name"]: folder / s["file"] for s in cfg["stages"]}
        # The two estimators are opened on first use: a stream needs one of them (both at once would
        # hold the DiT's weights twice).
        self.sessions = LazySessions({k: files[k] for k in ("flow_estimator", CACHED_ESTIMATOR_STAGE[0]) if k in files}, options)
        self.encoder = open_session(files["flow_encoder"], options)
        self.f0_session = open_session(files["hift_f0"], options)
        self.decoder = open_session(files["hift"], options)
        self.noise = np.load(files["flow_noise"], mmap_mode="r")  # (80, frames)
        f, h = cfg["flow"], cfg["hift"]
        self.mel_bins, self.ratio, self.lookahead = int(f["mel_bins"]), int(f["token_mel_ratio"]), int(f["pre_lookahead_len"])
        self.cfg_rate = np.float32(f["inference_cfg_rate"])
        self.static_chunk = int(f["static_chunk_size"])  # frames: the yaml's chunk attention (streaming=True)
        self.encoder_left_tokens = f.get("encoder_left_tokens")  # None in bundles without the cached estimator
        t = np.linspace(0, 1, int(f["n_timesteps"]) + 1, dtype=np.float32)
        self.t_span = (1 - np.cos(t * np.float32(0.5 * np.pi))).astype(np.float32) if f["t_scheduler"] == "cosine" else t
        self.spks = np.asarray(cfg["speaker"]["spks"], np.float32)
        self.hop, self.f0_lookahead, self.pre_lookahead = int(h["hop"]), int(h["f0_look_right"]), int(h["conv_pre_look_right"])
        src = h["source"]
        self.source = CausalSource(SourceParams(**src["params"]), np.asarray(src["merge_weight"]), float(src["merge_bias"]), int(src["noise_seed"]))
        self.stream_hop, self.stream_lookahead = int(cfg["streaming"]["hop_tokens"]), int(cfg["streaming"]["lookahead_tokens"])

    # -- flow

    @property
    def estimator(self):
        return self.sessions["flow_estimator"]

    @property
    def has_cached_estimator(self) -> bool:
        return CACHED_ESTIMATOR_STAGE[0] in self.sessions and self.encoder_left_tokens is not None

    def mu_from(self, tokens: list[int], start: int, finalize: bool = True) -> np.ndarray:
        """mu of the frames of tokens[start:] (without the lookahead tokens' unless `finalize`), from
        the encoder run on those tokens and the `encoder_left_tokens` before them (its receptive field
        to the left): equal to ``mu(tokens, finalize)[:, ratio * start:]``."""
        left = start if self.encoder_left_tokens is None else int(self.encoder_left_tokens)
        lo = max(0, start - left)
        return self.mu(tokens[lo:], finalize)[:, (start - lo) * self.ratio:]

    def solve_cached(self, mu: np.ndarray, cache: "FlowCache", chunk_frames: int) -> np.ndarray:
        """`solve` (chunk attention) for the frames after the `cache.frames` already solved, mu (80, n)
        of these frames only; the cache grows by them. Equals the new frames of `solve` over all frames."""
        p, n = cache.frames, mu.shape[1]
        if p % chunk_frames:
            raise OmniliteError(f"a cached flow solve needs whole {chunk_frames}-frame chunks before it, got {p} frames.")
        if p + n > self.noise.shape[1]:
            raise OmniliteError(f"the reply needs {p + n} mel frames but the flow's fixed noise covers {self.noise.shape[1]} (300 s); "
                                "shorten the reply.")
        est = self.sessions[CACHED_ESTIMATOR_STAGE[0]]
        x = np.array(self.noise[:, p:p + n], np.float32)  # the noise at these frames' absolute indices
        mu_in = np.zeros((2, self.mel_bins, n), np.float32)
        mu_in[0] = mu
        feeds = {"mu": mu_in, "spks": np.stack([self.spks, np.zeros_like(self.spks)]), "cond": np.zeros((2, self.mel_bins, n), np.float32),
                 "chunk_frames": np.asarray(chunk_frames, np.int64)}
        r, span = self.cfg_rate, self.t_span
        t, dt = span[0], span[1] - span[0]
        for step in range(1, len(span)):
            feeds["x"] = np.stack([x, x])
            feeds["t"] = np.full(2, t, np.float32)
            feeds["past_k"], feeds["past_v"], feeds["conv1_context"], feeds["conv2_context"] = cache.state(step - 1, est)
            v, k, vv, c1, c2 = est.run(None, feeds)
            cache.append(step - 1, k, vv, c1, c2)
            x = x + dt * ((1 + r) * v[0] - r * v[1])
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        cache.frames = p + n
        return x

    def mu(self, tokens: list[int], finalize: bool = True) -> np.ndarray:
        """(T,) ids -> (80, ratio * T), or without the lookahead tokens' frames."""
        mu = self.encoder.run(None, {"tokens": np.asarray(tokens, np.int64)[None]})[0][0]
        return mu if finalize else mu[:, : -self.lookahead * self.ratio]

    def solve(self, mu: np.ndarray, chunk_frames: int | None = None) -> np.ndarray:
        """Euler ODE from the fixed noise with classifier-free guidance (one batch of two, as official).
        chunk_frames None: full attention."""
        n = mu.shape[1]
        if n > self.noise.shape[1]:
            raise OmniliteError(f"the reply needs {n} mel frames but the flow's fixed noise covers {self.noise.shape[1]} (300 s); "
                                "shorten the reply.")
        x = np.array(self.noise[:, :n], np.float32)
        mu_in = np.zeros((2, self.mel_bins, n), np.float32)
        mu_in[0] = mu
        feeds = {"mask": np.ones((2, 1, n), np.float32), "mu": mu_in, "spks": np.stack([self.spks, np.zeros_like(self.spks)]),
                 "cond": np.zeros((2, self.mel_bins, n), np.float32), "chunk_frames": np.asarray(chunk_frames or n, np.int64)}
        r, span = self.cfg_rate, self.t_span
        t, dt = span[0], span[1] - span[0]
        for step in range(1, len(span)):
            feeds["x"] = np.stack([x, x])
            feeds["t"] = np.full(2, t, np.float32)
            v = self.estimator.run(None, feeds)[0]
            x = x + dt * ((1 + r) * v[0] - r * v[1])
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        return x

    def mel(self, tokens: list[int], finalize: bool = True, chunk_frames: int | None = None) -> np.ndarray:
        return self.solve(self.mu(tokens, finalize), chunk_frames)

    # -- HiFT

    def f0(self, mel: np.ndarray) -> np.ndarray:
        return self.f0_session.run(None, {"mel": np.ascontiguousarray(mel, np.float32)[None]})[0][0]

    def decode(self, mel: np.ndarray, source: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {"mel": np.ascontiguousarray(mel, np.float32)[None],
                                       "source": np.ascontiguousarray(source, np.float32)[None]})[0][0]

    def audio(self, mel: np.ndarray, finalize: bool = True) -> np.ndarray:
        """HiFT over mel frames from frame 0. Without `finalize` the last frames are right context: the
        samples returned are those of the official non-final call (f0 lookahead 3 + conv_pre 4 frames
        of context, and one more frame dropped)."""
        n = mel.shape[1]
        if finalize:
            return self.decode(mel, self.source(self.f0(mel)))
        keep = n - self.f0_lookahead - self.pre_lookahead - 1
        if keep <= 0:
            return np.zeros(0, np.float32)
        usable = n - self.f0_lookahead  # frames whose f0 has its real right context
        f0 = self.f0(mel)[:usable]
        return self.decode(mel[:, :usable], self.source(f0))[: keep * self.hop]

    def offline(self, tokens: list[int], chunk_frames: int | None = None) -> np.ndarray:
        """Whole utterance (one ``finalize`` call, as the offline detokenizer does for a reply < 30 s)."""
        if not tokens:
            return np.zeros(0, np.float32)
        return self.audio(self.mel(tokens, chunk_frames=chunk_frames))

    def stream(self, hop_tokens: int | None = None, lookahead_tokens: int | None = None, chunk_frames: int | None = None,
               flow_window_tokens: int | None = None, hift_restart_tokens: int | None = None) -> "VocoderStream":
        """`chunk_frames` None: full attention, as Fun-Audio-Chat calls the flow (``streaming=False``);
        the yaml's ``static_chunk_size`` (50) gives CosyVoice3's own chunk attention (``streaming=True``).
        `flow_window_tokens` / `hift_restart_tokens`: the web demo's restarts (WEB_DEMO_*) that bound
        each call's cost; None keeps every token and frame (each call's cost grows with the reply)."""
        return VocoderStream(self, hop_tokens or self.stream_hop, self.lookahead if lookahead_tokens is None else lookahead_tokens,
                             chunk_frames, flow_window_tokens, hift_restart_tokens)


class FlowCache:
    """Per Euler step (the CFG halves batched): every DiT layer's keys / values of the frames solved so
    far (depth, 2, frames, inner) and the position convs' last inputs (2, kernel - 1, D). fp32: at the
    released shape (22 layers x 1024) that is 3.6 MB per frame (180 MB per second of audio)."""

    def __init__(self):
        self.frames = 0
        self.steps: dict[int, list[np.ndarray]] = {}

    def state(self, step: int, session) -> list[np.ndarray]:
        if step not in self.steps:
            shapes = {i.name: i.shape for i in session.get_inputs()}
            depth, _, _, inner = shapes["past_k"]
            _, ctx, dim = shapes["conv1_context"]
            empty = np.zeros((depth, 2, 0, inner), np.float32)
            self.steps[step] = [empty, empty, np.zeros((2, ctx, dim), np.float32), np.zeros((2, ctx, dim), np.float32)]
        return self.steps[step]

    def append(self, step: int, k: np.ndarray, v: np.ndarray, ctx1: np.ndarray, ctx2: np.ndarray) -> None:
        past_k, past_v = self.steps[step][:2]
        self.steps[step] = [np.concatenate([past_k, k], axis=2), np.concatenate([past_v, v], axis=2), ctx1, ctx2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for s in self.steps.values() for a in s)


class VocoderStream:
    """Tokens in (any burst size), audio out, as the official web demo streams token2wav. Without
    windows every call re-solves all tokens and re-vocodes all mel, as the official call does; with
    the web demo's windows the flow forgets the tokens before each `flow_window` boundary (a context
    cut: it starts again from the fixed noise's first frame) and HiFT starts afresh once
    `hift_restart` tokens have been cut (the frames the last call held back are lost, as there)."""

    def __init__(self, voc: OnnxVocoder, hop: int, lookahead: int, chunk_frames: int | None = None,
                 flow_window: int | None = None, hift_restart: int | None = None):
        if hop < 1 or lookahead < 0:
            raise OmniliteError(f"streaming needs hop >= 1 and lookahead >= 0 tokens, got hop {hop}, lookahead {lookahead}.")
        if chunk_frames is not None and chunk_frames < 1:
            raise OmniliteError(f"the flow's attention chunk must be at least 1 frame (or None for full attention), got {chunk_frames}.")
        if flow_window is not None and flow_window < hop:
            raise OmniliteError(f"the flow window must hold at least one hop ({hop} tokens), got {flow_window}.")
        self.voc, self.hop, self.lookahead, self.chunk_frames = voc, hop, lookahead, chunk_frames
        self.flow_window, self.hift_restart = flow_window, hift_restart
        self.tokens: list[int] = []  # from the flow window's start
        self.offset = 0  # tokens of self.tokens whose frames are in the mel cache
        self.cut = 0  # tokens cut from the flow window since HiFT last restarted
        self.mel = np.zeros((voc.mel_bins, 0), np.float32)
        self.samples = 0  # samples of the mel cache handed out
        self.calls = 0
        # Solve only the new frames when every call starts at a chunk boundary (chunk attention, a hop of
        # whole chunks, no flow window) and the bundle has the cached estimator; else re-solve all.
        self.flow_cache = (FlowCache() if voc.has_cached_estimator and chunk_frames is not None and flow_window is None
                           and (hop * voc.ratio) % chunk_frames == 0 else None)
        # With the cache HiFT runs on the new frames plus HIFT_CONTEXT_FRAMES before them; f0 and the
        # source (its phase sum carried) are made once per frame.
        self._f0_frames, self._cycles = 0, None
        self._source = np.zeros(0, np.float32)

    def push(self, tokens: list[int]) -> np.ndarray:
        self.tokens.extend(int(t) for t in tokens)
        out = []
        while self.offset + self.hop + self.lookahead <= len(self.tokens):
            out.append(self._call(self.offset + self.hop + self.lookahead, finalize=False))
            self.offset += self.hop
            if self.flow_window and self.offset >= self.flow_window:
                del self.tokens[:self.flow_window]
                self.offset -= self.flow_window
                self.cut += self.flow_window
                if self.hift_restart and self.cut >= self.hift_restart:
                    self.cut, self.samples = 0, 0
                    self.mel = np.zeros((self.voc.mel_bins, 0), np.float32)
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        if len(self.tokens) <= self.offset:
            return np.zeros(0, np.float32)
        return self._call(len(self.tokens), finalize=True)

    def _call(self, end: int, finalize: bool) -> np.ndarray:
        v = self.voc
        if self.flow_cache is not None:
            mu = v.mu_from(self.tokens[:end], self.offset)
            if not finalize:
                mu = mu[:, : (end - self.lookahead - self.offset) * v.ratio]
            mel = v.solve_cached(mu, self.flow_cache, self.chunk_frames)
        else:
            mu = v.mu(self.tokens[:end])
            if not finalize:
                mu = mu[:, : (end - self.lookahead) * v.ratio]
            mel = v.solve(mu, self.chunk_frames)[:, self.offset * v.ratio:]
        self.mel = np.concatenate([self.mel, mel], axis=1)
        audio = self._audio_window(finalize) if self.flow_cache is not None else v.audio(self.mel, finalize)[self.samples:]
        self.samples += len(audio)
        self.calls += 1
        return audio

    def _audio_window(self, finalize: bool) -> np.ndarray:
        """`OnnxVocoder.audio(self.mel, finalize)[self.samples:]` from the frames after the samples handed
        out and HIFT_CONTEXT_FRAMES before them: f0 and source only for frames not made yet."""
        v, mel, ctx = self.voc, self.mel, HIFT_CONTEXT_FRAMES
        n = mel.shape[1]
        usable = n if finalize else n - v.f0_lookahead  # frames whose f0 has its real right context
        keep = n if finalize else n - v.f0_lookahead - v.pre_lookahead - 1
        if keep <= 0:
            return np.zeros(0, np.float32)
        done = self._f0_frames
        if usable > done:
            lo = max(0, done - ctx)
            f0 = v.f0(mel[:, lo:])[done - lo:usable - lo]  # the f0 graph over the same last frames as a whole call
            src, self._cycles = v.source.segment(f0, done, self._cycles)
            self._source = np.concatenate([self._source, src])
            self._f0_frames = usable
        lo = max(0, self.samples // v.hop - ctx)
        audio = v.decode(mel[:, lo:usable], self._source[lo * v.hop:usable * v.hop])
        return audio[self.samples - lo * v.hop:(None if finalize else keep * v.hop - lo * v.hop)]


# ----------------------------------------------------------------------------- schedules

CHUNK_ALIGNED, OFFICIAL = "chunk-aligned", "official"
SCHEDULES = (CHUNK_ALIGNED, OFFICIAL)


@dataclass(frozen=True)
class Schedule:
    """How the reply's codes are streamed through the flow (NOTES.md, "Runtime: streaming schedule").

    * ``chunk-aligned`` (default): a call per 25 tokens (= the DiT's 50-frame attention chunk, the
      yaml's static_chunk_size) once 3 more exist, chunk attention: every frame is solved with exactly
      the context it has in the whole-utterance call, so streamed == whole (93 dB on the tiny);
    * ``official``: the web demo's hop 15 + 3 with full attention (``streaming=False``), whose streamed
      frames attend to frames that do not exist yet when they are emitted (9.6 dB from its own whole
      utterance on the tiny's random weights)."""

    name: str
    hop_tokens: int
    lookahead_tokens: int
    chunk_frames: int | None  # None: full attention

    @classmethod
    def named(cls, voc: OnnxVocoder, name: str) -> "Schedule":
        if name == CHUNK_ALIGNED:
            return cls(name, voc.static_chunk // voc.ratio, voc.lookahead, voc.static_chunk)
        if name == OFFICIAL:
            return cls(name, voc.stream_hop, voc.stream_lookahead, None)
        raise OmniliteError(f"vocoder schedule {name!r} is unknown; use one of: {', '.join(SCHEDULES)}.")

    def stream(self, voc: OnnxVocoder) -> VocoderStream:
        return voc.stream(self.hop_tokens, self.lookahead_tokens, self.chunk_frames)

    def whole(self, voc: OnnxVocoder, tokens: list[int]) -> np.ndarray:
        """The whole-utterance audio this schedule streams towards (same attention)."""
        return voc.offline(tokens, self.chunk_frames)
