"""Step-Audio 2's stages in the accuracy report (see `accuracy` for the principle: each stage gets the
reference bundle's upstream outputs, then the whole quantized chain runs against the whole reference chain).

* encoder: the first 25 s piece of the question (question.wav is one piece) through both encoder + adapter
  graphs, as the runtime feeds them (`StepAudio2Encoder`); row cosine and relative RMS, as the other families;
* llm: the reference rows spliced after ``<audio_start>`` in the bundle's prompt (for one piece the shared
  prefix / rows / suffix prefill is exactly the runtime's), teacher-forced on the reference's greedy reply:
  top-1 agreement and mean KL, as the other families (`accuracy._llm_section`);
* flow: speech codes through both flows with the runtime's streaming windows (25 + 3 lookahead tokens, the
  voice prompt's caches, fixed noise, so deterministic); relative error of the concatenated mel;
* vocoder (HiFT): the reference mel through both; waveform SNR and log-mel distance at 24 kHz.

Codes: the reference reply's audio ids when it holds at least one flow window (28 codes), else a fixed
seeded sequence of 63 codes (windows 28, 28, 13; random weights write few audio ids). The end-to-end
audio (informational) is each chain's token2wav on its own reply's codes when the reference reply had a
window's worth, else both token2wav chains on the fixed codes (said in `audio_codes_source`).
"""

from __future__ import annotations

import logging

import numpy as np

from omnilite.runtime.bundle import Bundle
from omnilite.runtime.metrics import relative_l2_error, relative_max_error, snr_db
from omnilite.runtime.onnx_session import SessionOptions
from omnilite.runtime.step_audio2.pipeline import PieceMels, StepAudio2Encoder
from omnilite.runtime.step_audio2.vocoder import Token2Wav, VoicePrompt

from .accuracy import (AccuracyOptions, _judge, _llm_section, _same_file, _stage_of, audio_comparison, encoder_report,
                       fixed_units, log_mel_distance_db, sequence_agreement)

log = logging.getLogger(__name__)

FIXED_CODES = 63  # two full flow windows and a last one: the streaming caches are exercised


def reply_codes(bundle: Bundle, tokens: list[int]) -> list[int]:
    """The speech codes in a reply's ids (every ``<audio_k>`` with k < the flow's vocabulary), in order."""
    out = bundle["output_tokens"]
    base, n = int(out["audio_code_base"]), int(out["audio_codes"])
    return [t - base for t in tokens if base <= t < base + n]


def _streamed_mel(t2w: Token2Wav, prompt: VoicePrompt, codes: list[int]) -> np.ndarray:
    """The runtime's flow windows over `codes`, concatenated: (80, 2 * len(codes))."""
    return np.concatenate(t2w.flow.stream(np.asarray(codes, np.int64), prompt.tokens, prompt.mel, prompt.xvector), axis=1)


def _speech(t2w: Token2Wav, prompt: VoicePrompt, codes: list[int]) -> np.ndarray:
    """What the runtime plays for `codes`: the streamed token2wav (flow windows -> HiFT stream)."""
    if len(codes) < t2w.lookahead:
        return np.zeros(0, np.float32)
    return np.concatenate(list(t2w.stream(np.asarray(codes, np.int64), prompt.tokens, prompt.mel, prompt.xvector)))


def step_audio2_sections(quantized: Bundle, reference: Bundle, speech: np.ndarray, ort_opts: SessionOptions,
                         options: AccuracyOptions) -> tuple[dict, dict, dict]:
    """(stage reports, end-to-end fields, input fields) for a Step-Audio 2 bundle."""
    stages: dict[str, dict] = {}
    overrides = options.tolerances

    # Encoder (+ adapter) -----------------------------------------------------------------------
    enc_ref = StepAudio2Encoder(reference, ort_opts)
    pieces = enc_ref.mel(speech)
    first = PieceMels(pieces.mels[:1])  # the LLM section's prompt holds one piece (the question is 3.6 s)
    rows_ref = enc_ref.embed(first)[0]
    same_enc = _same_file(quantized, reference, _stage_of(quantized, "encoder"))
    rows_q = rows_ref if same_enc else StepAudio2Encoder(quantized, ort_opts).embed(first)[0]
    del enc_ref
    stages["encoder"] = encoder_report(quantized, rows_ref, rows_q, same_enc, overrides)

    # LLM ---------------------------------------------------------------------------------------
    stages["llm"], end_to_end, (tok_ref, _, tok_e2e, _) = _llm_section(quantized, reference, rows_ref, rows_q,
                                                                       same_enc, options)

    # Flow ----------------------------------------------------------------------------------------
    t2w_ref = Token2Wav(reference.path, ort_opts)
    same_flow = all(_same_file(quantized, reference, s) for s in ("flow_encoder", "flow_estimator", "flow_noise"))
    same_voc = all(_same_file(quantized, reference, s) for s in ("hift", "hift_f0"))
    t2w_q = t2w_ref if same_flow and same_voc else Token2Wav(quantized.path, ort_opts)
    prompt = VoicePrompt.load(reference.file("voice_prompt"))
    codes_ref, codes_e2e = reply_codes(reference, tok_ref), reply_codes(quantized, tok_e2e)
    window = t2w_ref.chunk_tokens + t2w_ref.lookahead
    enough = len(codes_ref) >= window
    codes = codes_ref if enough else fixed_units(FIXED_CODES, vocab=int(reference["output_tokens"]["audio_codes"]))
    source = "reference LLM reply" if enough else f"fixed sequence (the reference reply held {len(codes_ref)} < {window} codes)"
    mel_ref = _streamed_mel(t2w_ref, prompt, codes)
    mel_q = mel_ref if same_flow else _streamed_mel(t2w_q, prompt, codes)
    diff = mel_q.astype(np.float64) - mel_ref
    metrics = {
        "mel_rel_error": relative_l2_error(mel_ref, mel_q),
        "mel_rel_max_error": relative_max_error(mel_ref, mel_q),
        "mel_mean_abs_error": float(np.mean(np.abs(diff))),
        "codes": len(codes), "codes_source": source, "mel_frames": int(mel_ref.shape[1]),
    }
    st = _stage_of(quantized, "flow")
    stages["flow"] = {"stage": st, **_judge("flow", quantized.stages[st].precision, metrics, overrides, same_flow)}
    log.info("accuracy: flow mel relative error %.4f", metrics["mel_rel_error"])

    # Vocoder (HiFT) ------------------------------------------------------------------------------
    wav_ref = t2w_ref.hift.offline(mel_ref)
    wav_q = wav_ref if same_voc else t2w_q.hift.offline(mel_ref)
    rate = t2w_ref.sample_rate
    metrics = {"snr_db": snr_db(wav_ref, wav_q), "log_mel_distance_db": log_mel_distance_db(wav_ref, wav_q, rate),
               "audio_seconds": round(len(wav_ref) / rate, 3)}
    st = _stage_of(quantized, "vocoder")
    stages["vocoder"] = {"stage": st, **_judge("vocoder", quantized.stages[st].precision, metrics, overrides, same_voc)}
    log.info("accuracy: vocoder SNR %.1f dB", metrics["snr_db"])

    # End to end (informational) ------------------------------------------------------------------
    audio_ref = _speech(t2w_ref, prompt, codes)
    audio_q = _speech(t2w_q, prompt, codes_e2e if enough else codes)
    end_to_end.update({"unit_agreement": sequence_agreement(codes_ref, codes_e2e), "audio_codes_source": source,
                       **audio_comparison(audio_ref, audio_q, rate)})
    inputs = {"pieces": len(pieces.mels), "pieces_used": 1, "audio_codes_reference": len(codes_ref),
              "audio_codes_quantized": len(codes_e2e)}
    return stages, end_to_end, inputs
