"""LLaMA-Omni2 parity at export time: each exported stage, run by the runtime's own code, against the
PyTorch reference on fixed inputs. Thresholds are the issue's acceptance ones; the report goes into
the manifest and a stage that misses its threshold fails the export (unless told otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig
from omnilite.runtime.metrics import cosine_rows, relative_max_error, snr_db
from omnilite.runtime.omni2.flow import FlowDecoder
from omnilite.runtime.omni2.hift import HiFTVocoder
from omnilite.runtime.omni2.tts import TTSWriter

from ..parity import _prefix_agreement, fixed_audio, mel_and_encoder_parity
from .reference import Omni2ReferencePipeline, rw_chunks

PARITY_TOKENS = 32
PARITY_TTS_TOKENS = 48
THRESHOLDS = {
    "mel_max_abs": 1e-4,
    "encoder_rel_max": 1e-3,
    "hidden_cosine_min": 0.999,
    "flow_rel_max": 1e-3,
    "hift_snr_db": 40.0,
}


def _kv(bundle, stage: str) -> str:
    return "f32" if bundle.stages[stage].precision == "f32" else "f16"


def tts_parity(ref: Omni2ReferencePipeline, bundle, tokens: list[int], hidden: np.ndarray, read: int, write: int,
               max_tts: int) -> tuple[list[int], list[int]]:
    """Reference and runtime TTS token streams for the same LLM tokens/hidden states under (read, write)."""
    steps = ref.speech_tokens(tokens, torch.from_numpy(hidden), read, write, max_tts)
    ref_stream = [t for s in steps for t in s]
    writer = TTSWriter(bundle, LLMConfig(n_ctx=4096, kv_cache=_kv(bundle, "tts_lm")))
    try:
        rt_stream = []
        chunks = rw_chunks(len(tokens), read)
        for i, (a, b) in enumerate(chunks):
            last = i == len(chunks) - 1
            rt_stream += writer.write(hidden[a:b], tokens[a:b], finished=last, max_new=max_tts if last else write)
    finally:
        writer.close()
    return ref_stream, rt_stream


def measure_parity(ref: Omni2ReferencePipeline, bundle_dir: Path) -> dict:
    bundle = load_bundle(bundle_dir, verify=False)
    audio = fixed_audio()
    report: dict = {"input": "fixed synthetic 3 s signal (seed 1234)", "tokens": PARITY_TOKENS}

    report.update(mel_and_encoder_parity(ref, bundle, audio))

    _, emb = ref.speech_embeddings(audio)
    tokens_ref, hidden_ref = ref.text(emb, PARITY_TOKENS, ignore_eos=True)
    hidden_ref = hidden_ref.numpy()
    with LlamaCppLLM(bundle.file("llm"), LLMConfig(kv_cache=_kv(bundle, "llm"))) as llm:
        llm.eval_tokens(ref.prompt.prefix_ids)
        llm.eval_embeddings(emb.numpy())
        first = llm.eval_tokens(ref.prompt.suffix_ids, want_last=True)
        pairs = list(llm.generate(PARITY_TOKENS, ignore_eos=True, first=first))
    tokens_rt = [t for t, _ in pairs]
    agree = _prefix_agreement(tokens_ref, tokens_rt)
    n = min(len(hidden_ref), len(pairs))
    cos = float(cosine_rows(hidden_ref[:n], np.stack([h for _, h in pairs])[:n]).min())
    report["llm"] = {"greedy_tokens_identical": agree, "of": PARITY_TOKENS, "hidden_cosine_min": cos,
                     "threshold_cosine": THRESHOLDS["hidden_cosine_min"],
                     "ok": agree == PARITY_TOKENS and cos >= THRESHOLDS["hidden_cosine_min"]}

    read, write = 3, 10
    ref_tts, rt_tts = tts_parity(ref, bundle, tokens_ref, hidden_ref, read, write, PARITY_TTS_TOKENS)
    agree = _prefix_agreement(ref_tts, rt_tts)
    report["tts_lm"] = {"greedy_tokens_identical": agree, "of": len(ref_tts), "read": read, "write": write,
                        "ok": agree == len(ref_tts) == len(rt_tts) and agree >= PARITY_TOKENS}

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
