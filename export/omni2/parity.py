"""LLaMA-Omni2 parity at export time: each exported stage, run by the runtime's own code, against the
PyTorch reference on fixed inputs. Thresholds are the issue's acceptance ones; the report goes into
the manifest and a stage that misses its threshold fails the export (unless told otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.llm import stage_llm_config
from omnilite.runtime.metrics import relative_max_error, snr_db
from omnilite.runtime.omni2.flow import FlowDecoder
from omnilite.runtime.omni2.hift import HiFTVocoder
from omnilite.runtime.omni2.tts import TTSWriter

from ..parity import THRESHOLDS as LM_THRESHOLDS
from ..parity import _prefix_agreement, fixed_audio, llm_parity, mel_and_encoder_parity
from .reference import Omni2ReferencePipeline, rw_chunks

PARITY_TOKENS = 32
PARITY_TTS_TOKENS = 48
THRESHOLDS = {"flow_rel_max": 1e-3, "hift_snr_db": 40.0}  # mel, encoder and LM bounds: ..parity.THRESHOLDS


def tts_parity(ref: Omni2ReferencePipeline, bundle, tokens: list[int], hidden: np.ndarray, read: int, write: int,
               max_tts: int) -> tuple[list[int], list[int]]:
    """Reference and runtime TTS token streams for the same LLM tokens/hidden states under (read, write)."""
    steps = ref.speech_tokens(tokens, torch.from_numpy(hidden), read, write, max_tts)
    ref_stream = [t for s in steps for t in s]
    writer = TTSWriter(bundle, stage_llm_config(bundle, "tts_lm", n_ctx=4096))
    try:
        rt_stream = []
        chunks = rw_chunks(len(tokens), read)
        for i, (a, b) in enumerate(chunks):
            last = i == len(chunks) - 1
            rt_stream += writer.write(hidden[a:b], tokens[a:b], finished=last, max_new=max_tts if last else write)
    finally:
        writer.close()
    return ref_stream, rt_stream


def _tts_first_logits_error(ref: Omni2ReferencePipeline, bundle, tokens: list[int], hidden: np.ndarray) -> float:
    """Max abs difference of the TTS LM's logits after the first read chunk's fused inputs."""
    with torch.no_grad():
        fused = ref.generator.fuse(torch.from_numpy(hidden), torch.tensor(tokens))
        logits_ref = ref.generator.model(inputs_embeds=fused[None]).logits[0, -1].numpy()
    writer = TTSWriter(bundle, stage_llm_config(bundle, "tts_lm", n_ctx=512))
    try:
        logits_rt = writer.lm.eval_embeddings(writer.fuse(hidden, tokens), want_last=True)[0]
    finally:
        writer.close()
    return float(np.max(np.abs(logits_ref - logits_rt)))


def measure_parity(ref: Omni2ReferencePipeline, bundle_dir: Path) -> dict:
    bundle = load_bundle(bundle_dir, verify=False)
    audio = fixed_audio()
    report: dict = {"input": "fixed synthetic 3 s signal (seed 1234); LLM: that, a 2 s one (seed 99) and question.wav",
                    "tokens": PARITY_TOKENS}

    report.update(mel_and_encoder_parity(ref, bundle, audio))

    report["llm"], tokens_ref, hidden_ref = llm_parity(ref, bundle)

    read, write = 3, 10
    ref_tts, rt_tts = tts_parity(ref, bundle, tokens_ref, hidden_ref, read, write, PARITY_TTS_TOKENS)
    agree = _prefix_agreement(ref_tts, rt_tts)
    first_abs = _tts_first_logits_error(ref, bundle, tokens_ref[:read], hidden_ref[:read])
    exact = bundle.stages["tts_lm"].precision == "f32"
    report["tts_lm"] = {"greedy_tokens_identical": agree, "of": len(ref_tts), "read": read, "write": write,
                        "first_logits_max_abs": first_abs, "flash_attn": stage_llm_config(bundle, "tts_lm").flash_attn,
                        "ok": agree == len(ref_tts) == len(rt_tts) and agree >= PARITY_TOKENS
                        and (first_abs <= LM_THRESHOLDS["first_logits_max_abs"] or not exact)}

    units = ref.units(ref_tts)
    flow = FlowDecoder(bundle)
    with torch.no_grad():
        mel_ref = ref.flow.inference(torch.tensor([units]), torch.from_numpy(ref.xvector)[None])[0].numpy()
    mel_rt = flow.offline(units)
    rel = relative_max_error(mel_ref, mel_rt)
    report["flow"] = {"units": len(units), "rel_max_error": rel, "threshold": THRESHOLDS["flow_rel_max"],
                      "ok": rel <= THRESHOLDS["flow_rel_max"]}

    voc = HiFTVocoder(bundle)
    with torch.no_grad():
        wav_ref, _ = ref.hift.inference(torch.from_numpy(mel_ref)[None])
    snr = snr_db(wav_ref[0].numpy(), voc.offline(mel_ref))
    report["hift"] = {"snr_db": snr, "threshold_db": THRESHOLDS["hift_snr_db"], "ok": snr >= THRESHOLDS["hift_snr_db"],
                      "source": "deterministic (zero initial phases, seeded noise)"}
    return report
