"""Parity of every exported stage against the PyTorch reference, on fixed inputs, at export time.

The report goes into the manifest. Thresholds are those of the LLaMA-Omni issue; a stage that
misses its threshold is marked `ok: false` and the export fails loudly (see `check_parity`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.encoder import ENCODER_MODES, SpeechEncoder
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig
from omnilite.runtime.mel import LogMel
from omnilite.runtime.metrics import cosine_rows, relative_max_error, snr_db
from omnilite.runtime.units import StreamingUnitGenerator
from omnilite.runtime.vocoder import UnitVocoder

from .reference import ReferencePipeline, greedy_decode
from .speech_encoder import log_mel_torch, padding_cache, reference_mode_embeddings

PARITY_TOKENS = 32
THRESHOLDS = {
    "mel_max_abs": 1e-4,
    "encoder_rel_max": 1e-3,
    "hidden_cosine_min": 0.999,
    "vocoder_snr_db": 40.0,
}


def fixed_audio(seconds: float = 3.0, seed: int = 1234) -> np.ndarray:
    """A deterministic speech-like test signal: voiced harmonics with a moving pitch plus noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3.1 * t)) ** 2
    return (0.1 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def mel_and_encoder_parity(ref, bundle, audio: np.ndarray) -> dict:
    """numpy log-mel vs torch, and the encoder+adapter ONNX vs PyTorch in every encoder mode (both
    families: `ref` has n_mels, encoder and speech_embeddings(audio, pad_to_30s))."""
    mel_ref = log_mel_torch(torch.from_numpy(audio), ref.n_mels).numpy()
    err = float(np.max(np.abs(mel_ref - LogMel(ref.n_mels)(audio))))
    out = {"mel": {"max_abs_error": err, "threshold": THRESHOLDS["mel_max_abs"], "ok": err <= THRESHOLDS["mel_max_abs"]}}
    encoder = SpeechEncoder(bundle)
    enc = {}
    for mode, pad in (("exact", True), ("unpadded", False)):
        mel, emb_ref = ref.speech_embeddings(audio, pad_to_30s=pad)
        enc[mode] = relative_max_error(emb_ref.numpy(), encoder.embed(mel.numpy()))
    # Every other encoder mode (the default is a +fill one): same windows and numpy mel on both
    # sides, the PyTorch stage per window.
    padding = padding_cache(ref.encoder, ref.n_mels, encoder.max_frames)
    for mode in ENCODER_MODES:
        if mode not in enc:
            emb_ref = reference_mode_embeddings(ref.encoder, audio, mode, ref.n_mels, encoder.frames_per_position, padding)
            enc[mode] = relative_max_error(emb_ref, encoder(audio, mode))
    out["encoder"] = {"rel_max_error": enc, "threshold": THRESHOLDS["encoder_rel_max"],
                      "ok": max(enc.values()) <= THRESHOLDS["encoder_rel_max"]}
    return out


def measure_parity(ref: ReferencePipeline, bundle_dir: Path, omega: int = 10) -> dict:
    bundle = load_bundle(bundle_dir, verify=False)
    audio = fixed_audio()
    report: dict = {"input": "fixed synthetic 3 s signal (seed 1234)", "tokens": PARITY_TOKENS}

    report.update(mel_and_encoder_parity(ref, bundle, audio))

    with torch.no_grad():
        _, emb = ref.speech_embeddings(audio)
        tokens_ref, hidden_ref = greedy_decode(ref.llm, ref.prompt.prefix_ids, emb, ref.prompt.suffix_ids,
                                               PARITY_TOKENS, ref.eos_ids, ignore_eos=True)
    hidden_ref = hidden_ref.numpy()
    kv = "f32" if bundle.stages["llm"].precision == "f32" else "f16"
    with LlamaCppLLM(bundle.file("llm"), LLMConfig(kv_cache=kv)) as llm:
        llm.eval_tokens(ref.prompt.prefix_ids)
        llm.eval_embeddings(emb.numpy())
        first = llm.eval_tokens(ref.prompt.suffix_ids, want_last=True)
        pairs = list(llm.generate(PARITY_TOKENS, ignore_eos=True, first=first))
    tokens_rt = [t for t, _ in pairs]
    hidden_rt = np.stack([h for _, h in pairs])
    agree = _prefix_agreement(tokens_ref, tokens_rt)
    n = min(len(hidden_ref), len(hidden_rt))
    cos = float(cosine_rows(hidden_ref[:n], hidden_rt[:n]).min())
    report["llm"] = {"greedy_tokens_identical": agree, "of": PARITY_TOKENS, "hidden_cosine_min": cos,
                     "threshold_cosine": THRESHOLDS["hidden_cosine_min"],
                     "ok": agree == PARITY_TOKENS and cos >= THRESHOLDS["hidden_cosine_min"]}

    units_ref = ref.generator.predict(torch.from_numpy(hidden_ref))
    gen = StreamingUnitGenerator(bundle)
    offline = gen.push(hidden_ref)
    gen.reset()
    chunked = [u for a in range(0, len(hidden_ref), omega) for u in gen.push(hidden_ref[a:a + omega])]
    report["speech_generator"] = {"units_reference": len(units_ref), "offline_identical": offline == units_ref,
                                  "chunked_identical": chunked == units_ref, "omega": omega,
                                  "ok": offline == units_ref and chunked == units_ref}

    voc = UnitVocoder(bundle)
    with torch.no_grad():
        u = torch.tensor([units_ref])
        dur_ref = ref.vocoder.durations(u)[0].numpy()
        wav_ref = ref.vocoder(u)[0].numpy()
    dur_rt = voc.durations(np.asarray(units_ref))
    snr = snr_db(wav_ref, voc.offline(units_ref))
    report["vocoder"] = {"durations_identical": bool(np.array_equal(dur_ref, dur_rt)), "snr_db": snr,
                         "threshold_db": THRESHOLDS["vocoder_snr_db"],
                         "ok": bool(np.array_equal(dur_ref, dur_rt)) and snr >= THRESHOLDS["vocoder_snr_db"]}
    return report


def _prefix_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
