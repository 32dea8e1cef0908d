"""Fun-Audio-Chat's vocoder (CosyVoice3 flow + causal HiFT) as ONNX stages: `write_vocoder_stages`
(into a directory being built, e.g. a bundle's) and `export_vocoder(checkpoint, out_dir) -> parity
report` (a stand-alone vocoder directory). The torch-free driver that runs them (`OnnxVocoder`,
`VocoderStream`, `CausalSource`) lives in ``runtime/fun_audio_chat/vocoder.py``.

Files written (atomically, through ``bundle_dir.building_dir``):

* ``flow_encoder.onnx``   tokens (1, T) -> mu (1, 80, 2T): embedding + pre-lookahead conv + repeat, with
                          zeros past the last token (``finalize``); a streaming call drops the frames of
                          its last 3 tokens, which equals the official ``context`` form (tested)
* ``flow_estimator.onnx`` the DiT with the official inputs (x, mask, mu, t, spks, cond) plus
                          ``chunk_frames`` (attention chunk; >= the frame count = full attention, which
                          is what Fun-Audio-Chat's ``streaming=False`` calls use)
* ``flow_estimator_cached.onnx`` the same DiT on the new frames of a chunk-attention solve only: x, mu,
                          cond (2, 80, n), t, spks, the earlier frames' per-layer keys / values
                          ``past_k`` / ``past_v`` (depth, 2, P, inner; P whole chunks) and the position
                          convs' last inputs ``conv1_context`` / ``conv2_context`` (2, 30, D), plus
                          ``chunk_frames`` -> velocity and the new frames' ``new_k`` / ``new_v`` and
                          contexts: the chunk-aligned stream solves each chunk once (linear in the reply)
* ``flow_noise.npy``      the flow's fixed initial noise (80 x 15000)
* ``hift_f0.onnx``        the causal f0 predictor, mel (1, 80, T) -> f0 (1, T) (zeros past the end)
* ``hift.onnx``           the causal HiFT decode, mel + source -> audio (zeros past the end)
* ``vocoder.json``        settings the driver needs (speaker vector, rates, source parameters), the
                          stage list with sha256, and the parity report
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.fun_audio_chat.vocoder import CACHED_ESTIMATOR_STAGE, RECORD_FILE, SOURCE_NOISE_SEED, STAGE_FILES, OnnxVocoder
from omnilite.runtime.metrics import snr_db

log = logging.getLogger(__name__)

# Parity thresholds (issue 16): flow mel with the fixed noise, HiFT vs the torch.stft reference, the
# ONNX stream vs the official streaming loop in PyTorch, streamed vs whole-utterance audio.
FLOW_MAX_ABS = 1e-3
HIFT_SNR_DB = 40.0
STREAM_REFERENCE_SNR_DB = 40.0
STREAM_WHOLE_SNR_DB = 25.0


# ----------------------------------------------------------------------------- export


def reference_cached_stream_mel(flow, tokens: list[int], embedding, hop: int, lookahead: int | None = None):
    """The chunk-aligned stream in PyTorch with the flow cache: a call per `hop` tokens once `lookahead`
    more exist (not finalize), then a finalize call; each solves only its new frames. -> (80, frames)."""
    import torch

    from .vocoder_reference import FlowCache, mu_window

    la = flow.c.pre_lookahead_len if lookahead is None else lookahead
    ratio, chunk = flow.c.token_mel_ratio, flow.c.static_chunk_size
    spks, cache, offset, mels = flow.speaker(embedding), FlowCache(), 0, []
    with torch.no_grad():
        while offset + hop + la <= len(tokens):
            mu = mu_window(flow, tokens[:offset + hop + la], offset, finalize=False)
            mels.append(flow.solve_cached(mu, spks, cache, chunk))
            offset += hop
        if len(tokens) > offset:
            mels.append(flow.solve_cached(mu_window(flow, tokens, offset, finalize=True), spks, cache, chunk))
    return torch.cat(mels, dim=2)[0].numpy()


def parity_tokens(n: int = 64, seed: int = 0) -> list[int]:
    """Fixed pseudo-random speech codes (0..6560) for the parity runs."""
    return [int(t) for t in np.random.Generator(np.random.PCG64(seed)).integers(0, 6561, n)]


def export_vocoder(checkpoint: str | Path, out_dir: str | Path, voice: str | None = None, overwrite: bool = False,
                   strict: bool = True, parity_length: int = 64) -> dict:
    """Export the vocoder of the release under `checkpoint` into `out_dir`; returns the parity report
    (also stored in ``vocoder.json``), measured on `parity_length` fixed tokens. With `strict`, a stage
    beyond its threshold fails the export and nothing is written."""
    from ..bundle_dir import building_dir
    from .checkpoint import open_cosyvoice3

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass overwrite=True.")
    ckpt = open_cosyvoice3(checkpoint)
    with building_dir(out) as tmp:
        report = write_vocoder_stages(ckpt, tmp, voice, parity_length=parity_length)
        failed = [k for k, v in report.items() if not v["ok"]]
        if failed and strict:
            raise OmniliteError(f"exported vocoder stage(s) {', '.join(failed)} differ from the PyTorch reference beyond tolerance "
                                f"({json.dumps({k: report[k] for k in failed})}); nothing was written.")
        for k in failed:
            log.warning("parity: %s misses its threshold: %s", k, report[k])
    return report


def write_vocoder_stages(ckpt, tmp: Path, voice: str | None = None, parity: bool = True, parity_length: int = 64) -> dict:
    """Write the vocoder's files into `tmp` (a directory being built) from an opened
    ``CosyVoice3Checkpoint``; returns the parity report (empty without `parity`), also stored in
    ``vocoder.json``. Refusing a failed report is the caller's choice."""
    import torch

    from omnilite import __version__
    from omnilite.runtime.bundle import sha256_file

    from ..onnx_export import export_onnx, io_shapes
    from .config import FAMILY, SPK2INFO_VOICE, STREAM_HOP_TOKENS, STREAM_LOOKAHEAD_TOKENS
    from .vocoder_reference import CachedEstimatorStage, EstimatorStage, F0Stage, FlowEncoderStage

    voice = voice or SPK2INFO_VOICE
    embedding = ckpt.speaker_embedding(voice)
    flow, hift = ckpt.flow(), ckpt.hift()
    t = 24
    mel_t = torch.zeros(2, 80, 2 * t)
    est = flow.decoder.estimator
    attn = est.transformer_blocks[0].attn
    depth, inner, ctx = len(est.transformer_blocks), attn.heads * attn.dim_head, est.input_embed.conv_pos_embed.kernel - 1
    past = torch.zeros(depth, 2, flow.c.static_chunk_size, inner)  # P != the example's frames: both stay symbolic
    stages = [
        ("flow_encoder.onnx", FlowEncoderStage(flow), (torch.zeros(1, t, dtype=torch.long),), {"tokens": {1: "tokens"}}, {"mu": {2: "frames"}}),
        ("flow_estimator.onnx", EstimatorStage(flow),
         (mel_t, torch.ones(2, 1, 2 * t), mel_t, torch.zeros(2), torch.zeros(2, 80), mel_t, torch.tensor(2 * t)),
         {"x": {2: "frames"}, "mask": {2: "frames"}, "mu": {2: "frames"}, "t": {}, "spks": {}, "cond": {2: "frames"}, "chunk_frames": {}},
         {"velocity": {2: "frames"}}),
        (CACHED_ESTIMATOR_STAGE[1], CachedEstimatorStage(flow),
         (mel_t, mel_t, torch.zeros(2), torch.zeros(2, 80), mel_t, past, past, torch.zeros(2, ctx, est.dim), torch.zeros(2, ctx, est.dim),
          torch.tensor(flow.c.static_chunk_size)),
         {"x": {2: "frames"}, "mu": {2: "frames"}, "t": {}, "spks": {}, "cond": {2: "frames"}, "past_k": {2: "past"},
          "past_v": {2: "past"}, "conv1_context": {}, "conv2_context": {}, "chunk_frames": {}},
         {"velocity": {2: "frames"}, "new_k": {2: "frames"}, "new_v": {2: "frames"}, "conv1_context_out": {}, "conv2_context_out": {}}),
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
                 # tokens before a frame's own that its mu depends on (the pre-lookahead conv2): a cached
                 # stream runs the encoder on the new tokens and these only
                 "encoder_left_tokens": flow.pre_lookahead_layer.conv2.kernel_size[0] - 1,
                 "attention": "full (streaming=False, as Fun-Audio-Chat calls token2wav); chunk_frames=T gives it"},
        "hift": {"hop": hc.hop, "sample_rate": hc.sampling_rate, "conv_pre_look_right": hc.conv_pre_look_right,
                 "f0_look_right": hc.f0_look_right,
                 "source": {"params": asdict(hc.source_params()), "merge_weight": [float(v) for v in lin.weight.detach().reshape(-1)],
                            "merge_bias": float(lin.bias.detach().reshape(())), "noise_seed": SOURCE_NOISE_SEED,
                            "note": "SineGen2 causal maths; uniform noise buffer = PCG64(seed), not torch's construction-time draw"}},
        "streaming": {"hop_tokens": STREAM_HOP_TOKENS, "lookahead_tokens": STREAM_LOOKAHEAD_TOKENS},
        "stages": [],
    }
    for name, file in (*STAGE_FILES, CACHED_ESTIMATOR_STAGE):
        entry = {"name": name, "file": file, "format": file.rsplit(".", 1)[1], "precision": "fp32", "sha256": sha256_file(tmp / file)}
        if file.endswith(".onnx"):
            entry["inputs"], entry["outputs"] = io_shapes(tmp / file)
            entry["extra_files"] = {f: sha256_file(tmp / f) for f in side[file]}
        record["stages"].append(entry)
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    report = measure_parity(flow, hift, embedding, OnnxVocoder(tmp), parity_tokens(parity_length)) if parity else {}
    record["parity"] = report
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return report


def measure_parity(flow, hift, embedding, voc: OnnxVocoder, tokens: list[int] | None = None) -> dict:
    """The report's checks (thresholds above), on fixed tokens and the release's voice:

    * flow: ONNX encoder + estimator + numpy Euler vs the reference, whole and streaming-call forms; and the
      chunk-aligned stream's mel (each chunk solved once with ``flow_estimator_cached.onnx`` when the stage
      exists) and the reference's own cached stream vs the reference's whole chunk-attention solve;
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

    # The chunk-aligned stream's mel (each chunk solved once from the flow cache when the stage exists)
    # vs the reference's whole solve with chunk attention, and the reference's own cached solve vs it.
    chunk = voc.static_chunk
    mel_chunk = flow.inference(ids, embedding, streaming=True)[0].numpy()
    s = voc.stream(chunk // voc.ratio, chunk_frames=chunk)
    s.push(tokens)
    s.flush()
    cached_err = float(np.max(np.abs(s.mel - mel_chunk)))
    ref_cached_err = float(np.max(np.abs(reference_cached_stream_mel(flow, tokens, embedding, chunk // flow.c.token_mel_ratio)
                                         - mel_chunk)))

    official, calls = streamed(voc.stream_hop, None)
    official_ref = torch.cat(token2wav_stream(flow, hift, tokens, embedding, voc.stream_hop, voc.stream_lookahead)).numpy()
    whole = voc.offline(tokens)
    aligned, aligned_calls = streamed(chunk // voc.ratio, chunk)
    aligned_whole = voc.offline(tokens, chunk)
    aligned_snr = snr_db(aligned_whole, aligned)
    ref_drift = snr_db(token2wav(flow, hift, tokens, embedding).numpy(), official_ref)
    stream_ref_snr = snr_db(official_ref, official)
    return {
        "flow": {"max_abs": flow_err, "threshold": FLOW_MAX_ABS, "frames": int(mel_ref.shape[1]),
                 # chunk-aligned stream (cached when s.flow_cache) vs the reference's whole chunk-attention solve
                 "chunk_stream_max_abs": cached_err, "chunk_stream_cached": s.flow_cache is not None,
                 "reference_cached_max_abs": ref_cached_err,
                 "ok": max(flow_err, cached_err, ref_cached_err) <= FLOW_MAX_ABS},
        "hift": {"snr_db": hift_snr, "threshold_db": HIFT_SNR_DB, "samples": len(audio_ref), "ok": hift_snr >= HIFT_SNR_DB},
        "stream_vs_reference": {"snr_db": stream_ref_snr, "threshold_db": STREAM_REFERENCE_SNR_DB, "hop_tokens": voc.stream_hop,
                                "lookahead_tokens": voc.stream_lookahead, "calls": calls, "ok": stream_ref_snr >= STREAM_REFERENCE_SNR_DB},
        "stream_vs_whole": {"snr_db": aligned_snr, "threshold_db": STREAM_WHOLE_SNR_DB, "hop_tokens": chunk // voc.ratio,
                            "chunk_frames": chunk, "calls": aligned_calls, "tokens": len(tokens),
                            "official_hop_snr_db": snr_db(whole, official), "official_hop_reference_snr_db": ref_drift,
                            "official_hop_chunk_attention_snr_db": snr_db(aligned_whole, streamed(voc.stream_hop, chunk)[0]),
                            # How far the chunk-aligned schedule's output is from the official one (full attention, whole).
                            "aligned_whole_vs_official_whole_snr_db": snr_db(whole, aligned_whole),
                            "ok": aligned_snr >= STREAM_WHOLE_SNR_DB},
    }
