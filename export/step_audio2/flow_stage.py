"""ONNX export of the Step-Audio 2 token2wav stages and their parity against the PyTorch reference.

* ``flow_encoder.onnx``   `FlowEncoderStage`: one chunk of the UpsampleConformerEncoderV2 + encoder_proj,
                          caches in and out (see runtime/step_audio2/flow.py for the interface)
* ``flow_estimator.onnx`` `FlowEstimatorStage`: the DiT's forward_chunk on the (conditioned,
                          unconditioned) batch, combined with the CFG rate; caches in and out
* ``flow_noise.npy``      the fixed initial noise (80 x 30000)
* ``hift_f0.onnx``, ``hift.onnx``  the CosyVoice2 HiFT export of export/omni2 (hift.pt is the same format)
* ``token2wav.json``      what the torch-free runtime needs besides the graphs (flow schedule, HiFT source)

Parity (fixed noise, seeded tokens, prompt mel and x-vector): ONNX vs PyTorch for the whole utterance
and for the streaming loop (mel max abs), streamed vs whole in PyTorch (SNR; the official streaming
attends only to earlier chunks, so the two differ by design), HiFT (SNR, deterministic source).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omnilite.runtime.metrics import snr_db
from omnilite.runtime.onnx_session import open_session
from omnilite.runtime.step_audio2.flow import ENCODER_FILE, ESTIMATOR_FILE, NOISE_FILE, StepAudio2FlowRuntime
from omnilite.runtime.step_audio2.vocoder import CONFIG_FILE, HIFT_F0_FILE, HIFT_FILE

from ..onnx_export import export_onnx
from ..omni2.hift import F0_RECEPTIVE_FIELD, HiFT, HiFTF0, measured_receptive_field
from .flow_reference import CHUNK_TOKENS, StepAudio2Flow, stream_schedule

FLOW_FILES = (ENCODER_FILE, ESTIMATOR_FILE, NOISE_FILE, HIFT_F0_FILE, HIFT_FILE, CONFIG_FILE)
THRESHOLDS = {"flow_max_abs": 1e-3, "stream_vs_whole_snr_db": 25.0, "hift_snr_db": 40.0}
PARITY_PROMPT_TOKENS = 20
PARITY_TOKENS = 63  # windows of 25 + 3, 25 + 3 and a last one of 13: both kinds of window


class FlowEncoderStage(nn.Module):
    def __init__(self, flow: StepAudio2Flow):
        super().__init__()
        self.flow = flow

    def forward(self, tokens, valid, cnn_cache, att1_cache, att2_cache):
        return self.flow.mu_chunk(tokens, valid, cnn_cache, att1_cache, att2_cache)


class FlowEstimatorStage(nn.Module):
    def __init__(self, flow: StepAudio2Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x, mu, t, xvector, cond, cnn_cache, att_cache):
        return self.flow.decoder.guided(x, mu, t, self.flow.speaker(xvector), cond, cnn_cache, att_cache)


def export_flow(flow: StepAudio2Flow, hift: HiFT, out: Path) -> list[str]:
    """Write the token2wav stage files into `out`; returns the files (and any side files) written."""
    c = flow.c
    t, tc = 8, 4  # example lengths; every time axis is dynamic
    dk = c.input_size // c.attention_heads
    written = []
    written += [ENCODER_FILE, *export_onnx(
        FlowEncoderStage(flow),
        (torch.zeros(1, t, dtype=torch.long), torch.ones(1, t), torch.zeros(1, c.input_size, 2 + 2 * c.up_stride),
         torch.zeros(c.num_blocks, 1, c.attention_heads, tc, 2 * dk), torch.zeros(c.num_up_blocks, 1, c.attention_heads, 2 * tc, 2 * dk)),
        out / ENCODER_FILE,
        {"tokens": {1: "tokens"}, "valid": {1: "tokens"}, "cnn_cache": {}, "att1_cache": {3: "cached"}, "att2_cache": {3: "cached2"}},
        {"mu": {2: "frames"}, "cnn_cache_out": {}, "att1_cache_out": {3: "cached_out"}, "att2_cache_out": {3: "cached2_out"}})]
    f = 2 * t
    written += [ESTIMATOR_FILE, *export_onnx(
        FlowEstimatorStage(flow),
        (torch.zeros(1, c.output_size, f), torch.zeros(1, c.output_size, f), torch.zeros(1), torch.zeros(1, c.spk_embed_dim),
         torch.zeros(1, c.output_size, f), torch.zeros(c.depth, 2, 2 * c.hidden_size, 2),
         torch.zeros(c.depth, 2, c.num_heads, tc, 2 * c.head_dim)),
        out / ESTIMATOR_FILE,
        {"x": {2: "frames"}, "mu": {2: "frames"}, "t": {}, "xvector": {}, "cond": {2: "frames"}, "cnn_cache": {},
         "att_cache": {3: "cached"}},
        {"v": {2: "frames"}, "cnn_cache_out": {}, "att_cache_out": {3: "cached_out"}})]
    np.save(out / NOISE_FILE, flow.noise[0].numpy())
    written.append(NOISE_FILE)
    written += [HIFT_F0_FILE, *export_onnx(HiFTF0(hift), (torch.zeros(1, 80, t),), out / HIFT_F0_FILE,
                                           {"mel": {2: "frames"}}, {"f0": {1: "frames"}})]
    written += [HIFT_FILE, *export_onnx(hift, (torch.zeros(1, 80, t), torch.zeros(1, t * hift.c.hop)), out / HIFT_FILE,
                                        {"mel": {2: "frames"}, "source": {1: "samples"}}, {"audio": {1: "samples"}})]
    (out / CONFIG_FILE).write_text(json.dumps(runtime_config(flow, hift), indent=2))
    written.append(CONFIG_FILE)
    return written


def runtime_config(flow: StepAudio2Flow, hift: HiFT) -> dict:
    """token2wav.json: the flow's streaming settings and HiFT's source/receptive field (the same keys as
    the LLaMA-Omni2 manifest's "hift", so runtime/omni2/hift.py's vocoder reads them)."""
    c, hc = flow.c, hift.c
    lin = hift.m_source.l_linear
    return {
        "flow": {"mel_bins": c.output_size, "n_timesteps": c.n_timesteps, "pre_lookahead_len": c.pre_lookahead_len,
                 "chunk_tokens": CHUNK_TOKENS, "token_mel_ratio": c.up_stride},
        "hift": {"hop": hc.hop, "sample_rate": hc.sampling_rate, "receptive_field_frames": measured_receptive_field(hift),
                 "f0_receptive_field": F0_RECEPTIVE_FIELD,
                 "source": {"harmonics": hc.nb_harmonics + 1, "sine_amp": hc.nsf_alpha, "noise_std": hc.nsf_sigma,
                            "voiced_threshold": hc.nsf_voiced_threshold,
                            "merge_weight": [float(v) for v in lin.weight.detach().reshape(-1)],
                            "merge_bias": float(lin.bias.detach().reshape(())), "noise_seed": 0}},
    }


def parity_case(seed: int = 11) -> dict[str, torch.Tensor]:
    """Seeded prompt (20 tokens, its 40-frame mel), x-vector and 63 reply tokens."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_tokens": torch.randint(0, 6561, (1, PARITY_PROMPT_TOKENS), generator=g),
            "tokens": torch.randint(0, 6561, (1, PARITY_TOKENS), generator=g),
            "prompt_mel": torch.randn(1, 2 * PARITY_PROMPT_TOKENS, 80, generator=g) - 6.0,
            "xvector": torch.randn(1, 192, generator=g)}


def flow_parity(flow: StepAudio2Flow, stage_dir: Path, case: dict[str, torch.Tensor] | None = None) -> dict:
    """Whole and streamed mel, ONNX (the runtime's driver) vs PyTorch, and streamed vs whole."""
    case = case or parity_case()
    pt, tk, pm, xv = case["prompt_tokens"], case["tokens"], case["prompt_mel"], case["xvector"]
    la = flow.c.pre_lookahead_len
    whole = flow.inference(tk, pt, pm, xv)[0].numpy()
    streamed = flow.stream(tk, pt, pm, xv, lookahead=tk[:, :la])[0].numpy()
    forked = flow.stream(tk, pt, pm, xv)[0].numpy()
    rt = StepAudio2FlowRuntime(stage_dir, n_timesteps=flow.c.n_timesteps, lookahead=la)
    args = (pt[0].numpy(), pm[0].numpy(), xv.numpy())
    whole_rt = rt.whole(tk[0].numpy(), *args)
    streamed_rt = np.concatenate(rt.stream(tk[0].numpy(), *args), axis=1)
    e_whole = float(np.max(np.abs(whole - whole_rt)))
    e_stream = float(np.max(np.abs(streamed - streamed_rt)))
    snr = snr_db(whole.ravel(), streamed.ravel())
    return {
        "flow_whole": {"prompt_tokens": pt.shape[1], "tokens": tk.shape[1], "mel_frames": whole.shape[1],
                       "max_abs_error": e_whole, "threshold": THRESHOLDS["flow_max_abs"], "ok": e_whole <= THRESHOLDS["flow_max_abs"]},
        "flow_stream": {"windows": len(stream_schedule(tk.shape[1], lookahead=la)), "max_abs_error": e_stream,
                        "threshold": THRESHOLDS["flow_max_abs"], "ok": e_stream <= THRESHOLDS["flow_max_abs"]},
        "flow_stream_vs_whole": {"snr_db": snr, "threshold_db": THRESHOLDS["stream_vs_whole_snr_db"],
                                 "prompt_lookahead_snr_db": snr_db(whole.ravel(), forked.ravel()),
                                 "ok": snr >= THRESHOLDS["stream_vs_whole_snr_db"]},
    }


def hift_parity(hift: HiFT, stage_dir: Path, mel: np.ndarray) -> dict:
    """ONNX f0 + decode with the runtime's deterministic source vs HiFT with torch's STFTs."""
    mel_t = torch.from_numpy(np.ascontiguousarray(mel, np.float32))[None]
    with torch.no_grad():
        wav_ref, f0_ref = hift.inference(mel_t)
    f0 = open_session(stage_dir / HIFT_F0_FILE).run(None, {"mel": mel_t.numpy()})[0][0]
    source = hift.source_generator()(f0)[None].astype(np.float32)
    wav = open_session(stage_dir / HIFT_FILE).run(None, {"mel": mel_t.numpy(), "source": source})[0][0]
    snr = snr_db(wav_ref[0].numpy(), wav)
    return {"hift": {"mel_frames": mel.shape[1], "f0_max_abs_error": float(np.max(np.abs(f0 - f0_ref))), "snr_db": snr,
                     "threshold_db": THRESHOLDS["hift_snr_db"], "ok": snr >= THRESHOLDS["hift_snr_db"],
                     "source": "deterministic (zero initial phases, seeded noise)"}}
