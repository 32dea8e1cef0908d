"""Fun-Audio-Chat's vocoder (CosyVoice3 flow + causal HiFT) as ONNX stages, their torch-free driver,
and `export_vocoder(checkpoint, out_dir) -> parity report`.

Files written to `out_dir` (atomically, through ``bundle_dir.building_dir``):

* ``flow_encoder.onnx``   tokens (1, T) -> mu (1, 80, 2T): embedding + pre-lookahead conv + repeat, with
                          zeros past the last token (``finalize``); a streaming call drops the frames of
                          its last 3 tokens, which equals the official ``context`` form (tested)
* ``flow_estimator.onnx`` the DiT with the official inputs (x, mask, mu, t, spks, cond) plus
                          ``chunk_frames`` (attention chunk; >= the frame count = full attention, which
                          is what Fun-Audio-Chat's ``streaming=False`` calls use)
* ``flow_noise.npy``      the flow's fixed initial noise (80 x 15000)
* ``hift_f0.onnx``        the causal f0 predictor, mel (1, 80, T) -> f0 (1, T) (zeros past the end)
* ``hift.onnx``           the causal HiFT decode, mel + source -> audio (zeros past the end)
* ``vocoder.json``        settings the driver needs (speaker vector, rates, source parameters), the
                          stage list with sha256, and the parity report

The driver (`OnnxVocoder`, `VocoderStream`) and `CausalSource` use numpy + onnxruntime only (this
module imports torch lazily, inside `export_vocoder`), so the runtime can take them over as they are.
Streaming follows the official web demo: a call per 15 tokens once 3 more exist, each re-solving
every token so far with full attention and keeping the frames from its offset; HiFT re-runs over the
mel so far and only the new samples are kept (exactly the samples the official call emits).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.onnx_session import SessionOptions, open_session

log = logging.getLogger(__name__)

RECORD_FILE = "vocoder.json"
STAGE_FILES = (("flow_encoder", "flow_encoder.onnx"), ("flow_estimator", "flow_estimator.onnx"), ("flow_noise", "flow_noise.npy"),
               ("hift_f0", "hift_f0.onnx"), ("hift", "hift.onnx"))
SOURCE_NOISE_SEED = 0
# Parity thresholds (issue 16): flow mel with the fixed noise, HiFT vs the torch.stft reference, the
# ONNX stream vs the official streaming loop in PyTorch, streamed vs whole-utterance audio.
FLOW_MAX_ABS = 1e-3
HIFT_SNR_DB = 40.0
STREAM_REFERENCE_SNR_DB = 40.0
STREAM_WHOLE_SNR_DB = 25.0
# The web demo bounds each call's work (utils/constant.py MAX_TTS_TOKENS, MAX_TTS_HISTORY): the flow's
# tokens restart every 200 (8 s), and the HiFT cache once 500 tokens have been cut that way.
WEB_DEMO_FLOW_WINDOW = 200
WEB_DEMO_HIFT_RESTART = 500


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
        p = self.p
        f0 = np.asarray(f0, np.float64).reshape(-1)
        k = np.arange(1, p.harmonics + 1, dtype=np.float64)
        cycles = np.cumsum(np.mod(f0[:, None] * k[None] / p.sample_rate, 1.0) * p.hop, axis=0)
        sines = np.repeat(p.sine_amp * np.sin(2 * np.pi * np.mod(cycles, 1.0)), p.hop, axis=0)
        uv = np.repeat((f0 > p.voiced_threshold).astype(np.float64), p.hop)[:, None]
        noise = (uv * p.noise_std + (1 - uv) * p.sine_amp / 3) * self.uniform(0, len(sines))
        return np.tanh((sines * uv + noise) @ self.weight + self.bias).astype(np.float32)


class OnnxVocoder:
    """The exported stages of `out_dir`, driven with numpy: tokens -> mel -> audio."""

    def __init__(self, folder: str | Path, options: SessionOptions = SessionOptions()):
        folder = Path(folder)
        record = folder / RECORD_FILE
        if not record.exists():
            raise OmniliteError(f"{record} is missing; export the vocoder stages into {folder} first.")
        cfg = json.loads(record.read_text())
        files = {s["name"]: folder / s["file"] for s in cfg["stages"]}
        self.encoder = open_session(files["flow_encoder"], options)
        self.estimator = open_session(files["flow_estimator"], options)
        self.f0_session = open_session(files["hift_f0"], options)
        self.decoder = open_session(files["hift"], options)
        self.noise = np.load(files["flow_noise"], mmap_mode="r")  # (80, frames)
        f, h = cfg["flow"], cfg["hift"]
        self.mel_bins, self.ratio, self.lookahead = int(f["mel_bins"]), int(f["token_mel_ratio"]), int(f["pre_lookahead_len"])
        self.cfg_rate = np.float32(f["inference_cfg_rate"])
        self.static_chunk = int(f["static_chunk_size"])  # frames: the yaml's chunk attention (streaming=True)
        t = np.linspace(0, 1, int(f["n_timesteps"]) + 1, dtype=np.float32)
        self.t_span = (1 - np.cos(t * np.float32(0.5 * np.pi))).astype(np.float32) if f["t_scheduler"] == "cosine" else t
        self.spks = np.asarray(cfg["speaker"]["spks"], np.float32)
        self.hop, self.f0_lookahead, self.pre_lookahead = int(h["hop"]), int(h["f0_look_right"]), int(h["conv_pre_look_right"])
        src = h["source"]
        self.source = CausalSource(SourceParams(**src["params"]), np.asarray(src["merge_weight"]), float(src["merge_bias"]), int(src["noise_seed"]))
        self.stream_hop, self.stream_lookahead = int(cfg["streaming"]["hop_tokens"]), int(cfg["streaming"]["lookahead_tokens"])

    # -- flow

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
        mu = v.mu(self.tokens[:end])
        if not finalize:
            mu = mu[:, : (end - self.lookahead) * v.ratio]
        mel = v.solve(mu, self.chunk_frames)[:, self.offset * v.ratio:]
        self.mel = np.concatenate([self.mel, mel], axis=1)
        audio = v.audio(self.mel, finalize)[self.samples:]
        self.samples += len(audio)
        self.calls += 1
        return audio


# ----------------------------------------------------------------------------- export


def parity_tokens(n: int = 64, seed: int = 0) -> list[int]:
    """Fixed pseudo-random speech codes (0..6560) for the parity runs."""
    return [int(t) for t in np.random.Generator(np.random.PCG64(seed)).integers(0, 6561, n)]


def export_vocoder(checkpoint: str | Path, out_dir: str | Path, voice: str | None = None, overwrite: bool = False,
                   strict: bool = True, parity_length: int = 64) -> dict:
    """Export the vocoder of the release under `checkpoint` into `out_dir`; returns the parity report
    (also stored in ``vocoder.json``), measured on `parity_length` fixed tokens. With `strict`, a stage
    beyond its threshold fails the export and nothing is written."""
    import torch

    from omnilite import __version__
    from omnilite.runtime.bundle import sha256_file

    from ..bundle_dir import building_dir
    from ..onnx_export import export_onnx, io_shapes
    from .checkpoint import open_cosyvoice3
    from .config import FAMILY, SPK2INFO_VOICE, STREAM_HOP_TOKENS, STREAM_LOOKAHEAD_TOKENS
    from .vocoder_reference import EstimatorStage, F0Stage, FlowEncoderStage

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass overwrite=True.")
    ckpt = open_cosyvoice3(checkpoint)
    voice = voice or SPK2INFO_VOICE
    embedding = ckpt.speaker_embedding(voice)
    flow, hift = ckpt.flow(), ckpt.hift()
    with building_dir(out) as tmp:
        t = 24
        mel_t = torch.zeros(2, 80, 2 * t)
        stages = [
            ("flow_encoder.onnx", FlowEncoderStage(flow), (torch.zeros(1, t, dtype=torch.long),), {"tokens": {1: "tokens"}}, {"mu": {2: "frames"}}),
            ("flow_estimator.onnx", EstimatorStage(flow),
             (mel_t, torch.ones(2, 1, 2 * t), mel_t, torch.zeros(2), torch.zeros(2, 80), mel_t, torch.tensor(2 * t)),
             {"x": {2: "frames"}, "mask": {2: "frames"}, "mu": {2: "frames"}, "t": {}, "spks": {}, "cond": {2: "frames"}, "chunk_frames": {}},
             {"velocity": {2: "frames"}}),
            ("hift_f0.onnx", F0Stage(hift), (torch.zeros(1, 80, t),), {"mel": {2: "frames"}}, {"f0": {1: "frames"}}),
            ("hift.onnx", hift, (torch.zeros(1, 80, t), torch.zeros(1, t * hift.c.hop)), {"mel": {2: "frames"}, "source": {1: "samples"}},
             {"audio": {1: "samples"}}),
        ]
        side: dict[str, list[str]] = {}  # weights past 1 GB (the real DiT) go to a side file
        for file, module, example, dyn_in, dyn_out in stages:
            log.info("export: %s", file)
            side[file] = export_onnx(module, example, tmp / file, dyn_in, dyn_out)
        np.save(tmp / "flow_noise.npy", flow.noise[0].numpy())
        fc, hc = flow.c, hift.c
        lin = hift.m_source.l_linear
        record = {
            "family": FAMILY,
            "created_by": f"omnilite {__version__}",
            "note": "vocoder stages (CosyVoice3 flow + causal HiFT), not a bundle",
            "source": {"vocoder_dir": str(ckpt.vocoder_dir.resolve()), "spk2info": str(ckpt.spk2info.resolve()), "voice": voice},
            "audio": {"sample_rate": hc.sampling_rate},
            "speaker": {"embedding": [float(v) for v in embedding[0]],
                        "spks": [float(v) for v in flow.speaker(embedding)[0].detach()]},
            "flow": {"mel_bins": fc.output_size, "token_mel_ratio": fc.token_mel_ratio, "pre_lookahead_len": fc.pre_lookahead_len,
                     "n_timesteps": fc.n_timesteps, "t_scheduler": fc.t_scheduler, "inference_cfg_rate": fc.inference_cfg_rate,
                     "static_chunk_size": fc.static_chunk_size, "noise_frames": int(flow.noise.shape[-1]),
                     "attention": "full (streaming=False, as Fun-Audio-Chat calls token2wav); chunk_frames=T gives it"},
            "hift": {"hop": hc.hop, "sample_rate": hc.sampling_rate, "conv_pre_look_right": hc.conv_pre_look_right,
                     "f0_look_right": hc.f0_look_right,
                     "source": {"params": asdict(hc.source_params()), "merge_weight": [float(v) for v in lin.weight.detach().reshape(-1)],
                                "merge_bias": float(lin.bias.detach().reshape(())), "noise_seed": SOURCE_NOISE_SEED,
                                "note": "SineGen2 causal maths; uniform noise buffer = PCG64(seed), not torch's construction-time draw"}},
            "streaming": {"hop_tokens": STREAM_HOP_TOKENS, "lookahead_tokens": STREAM_LOOKAHEAD_TOKENS},
            "stages": [],
        }
        for name, file in STAGE_FILES:
            entry = {"name": name, "file": file, "format": file.rsplit(".", 1)[1], "precision": "fp32", "sha256": sha256_file(tmp / file)}
            if file.endswith(".onnx"):
                entry["inputs"], entry["outputs"] = io_shapes(tmp / file)
                entry["extra_files"] = {f: sha256_file(tmp / f) for f in side[file]}
            record["stages"].append(entry)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
        report = measure_parity(flow, hift, embedding, OnnxVocoder(tmp), parity_tokens(parity_length))
        record["parity"] = report
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
        failed = [k for k, v in report.items() if not v["ok"]]
        if failed and strict:
            raise OmniliteError(f"exported vocoder stage(s) {', '.join(failed)} differ from the PyTorch reference beyond tolerance "
                                f"({json.dumps({k: report[k] for k in failed})}); nothing was written.")
        for k in failed:
            log.warning("parity: %s misses its threshold: %s", k, report[k])
    return report


def measure_parity(flow, hift, embedding, voc: OnnxVocoder, tokens: list[int] | None = None) -> dict:
    """The report's checks (thresholds above), on fixed tokens and the release's voice:

    * flow: ONNX encoder + estimator + numpy Euler vs the reference, whole and streaming-call forms;
    * hift: ONNX f0 + source + decode vs the reference (torch.stft / torch.istft, float64 f0);
    * stream_vs_reference: the official web-demo schedule (hop 15 + 3 lookahead, full attention)
      through the ONNX driver vs the same loop in PyTorch: catches offset / cache / trim errors;
    * stream_vs_whole: chunk-aligned streaming (hop = the yaml's attention chunk, 25 tokens, chunk
      attention, as CosyVoice3's own streaming) vs one whole call with the same attention. The
      official hop-15 schedule's drift is reported beside it, not gated: every frame attends to every
      other one there, so frames solved before their successors exist differ from the whole
      utterance's (the PyTorch loop drifts the same; see NOTES.md).
    """
    import torch

    from .vocoder_reference import token2wav, token2wav_stream

    tokens = parity_tokens() if tokens is None else tokens
    ids = torch.tensor([tokens])
    mel_ref = flow.inference(ids, embedding)[0].numpy()
    mel_ref_la = flow.inference(ids, embedding, finalize=False)[0].numpy()  # the official context form
    flow_err = max(float(np.max(np.abs(voc.mel(tokens) - mel_ref))), float(np.max(np.abs(voc.mel(tokens, finalize=False) - mel_ref_la))))

    audio_ref = hift.inference(torch.from_numpy(mel_ref)[None])[0].numpy()
    hift_snr = snr_db(audio_ref, voc.audio(mel_ref))

    def streamed(hop: int, chunk: int | None) -> tuple[np.ndarray, int]:
        s = voc.stream(hop, chunk_frames=chunk)
        return np.concatenate([s.push(tokens), s.flush()]), s.calls

    official, calls = streamed(voc.stream_hop, None)
    official_ref = torch.cat(token2wav_stream(flow, hift, tokens, embedding, voc.stream_hop, voc.stream_lookahead)).numpy()
    whole = voc.offline(tokens)
    chunk = voc.static_chunk
    aligned, aligned_calls = streamed(chunk // voc.ratio, chunk)
    aligned_snr = snr_db(voc.offline(tokens, chunk), aligned)
    ref_drift = snr_db(token2wav(flow, hift, tokens, embedding).numpy(), official_ref)
    stream_ref_snr = snr_db(official_ref, official)
    return {
        "flow": {"max_abs": flow_err, "threshold": FLOW_MAX_ABS, "frames": int(mel_ref.shape[1]), "ok": flow_err <= FLOW_MAX_ABS},
        "hift": {"snr_db": hift_snr, "threshold_db": HIFT_SNR_DB, "samples": len(audio_ref), "ok": hift_snr >= HIFT_SNR_DB},
        "stream_vs_reference": {"snr_db": stream_ref_snr, "threshold_db": STREAM_REFERENCE_SNR_DB, "hop_tokens": voc.stream_hop,
                                "lookahead_tokens": voc.stream_lookahead, "calls": calls, "ok": stream_ref_snr >= STREAM_REFERENCE_SNR_DB},
        "stream_vs_whole": {"snr_db": aligned_snr, "threshold_db": STREAM_WHOLE_SNR_DB, "hop_tokens": chunk // voc.ratio,
                            "chunk_frames": chunk, "calls": aligned_calls, "tokens": len(tokens),
                            "official_hop_snr_db": snr_db(whole, official), "official_hop_reference_snr_db": ref_drift,
                            "official_hop_chunk_attention_snr_db": snr_db(voc.offline(tokens, chunk), streamed(voc.stream_hop, chunk)[0]),
                            "ok": aligned_snr >= STREAM_WHOLE_SNR_DB},
    }
