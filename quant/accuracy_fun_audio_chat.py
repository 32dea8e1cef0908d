"""Fun-Audio-Chat's stages in the accuracy report (see `accuracy` for the principle: each stage gets the
reference bundle's upstream outputs, then the whole quantized chain runs against the whole reference chain).

The reference bundle's pipeline answers the question once (greedy S2M loop, eos ignored, so the length is
fixed) while every LLM evaluation (its ids or input rows, and the logits it returned) and every speech-head
step (its hidden states and text rows, its logits and codes) is recorded. Then:

* encoder (audio_input): the clip's ``<|AUDIO|>`` rows from both stages; row cosine and relative RMS;
* llm: the recorded evaluations replayed on the quantized LLM, i.e. teacher-forced on the reference reply
  with its speech rows spliced (after ``<|audio_bos|>`` each input is the text embedding averaged with the
  reference head's codes, as the runtime feeds it); mean KL and top-1 agreement of the next-token
  distributions from the suffix on (`tts`-style metrics, the LLM's tolerances);
* tts (the speech head): the recorded steps replayed on the quantized head with the reference hidden
  states, teacher-forced on the reference codes (`choose`); mean KL of the codebook distributions (judged,
  the `tts` role's bounds) and agreement of the argmax codes (reported);
* flow: the reference reply's codes through both flows (one whole solve from the fixed noise); mel relative error;
* vocoder (HiFT): the reference mel through both; waveform SNR and log-mel distance at the output rate;
* end to end (reported): the quantized bundle's own pipeline on the same question: text, codes and audio SNR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from omnilite.runtime import Done, Pipeline
from omnilite.runtime.bundle import Bundle
from omnilite.runtime.fun_audio_chat.pipeline import FunAudioChatConfig, FunAudioChatEncoder
from omnilite.runtime.fun_audio_chat.speech_head import HeadSpec, SpeechHead
from omnilite.runtime.fun_audio_chat.vocoder import OnnxVocoder
from omnilite.runtime.llm import LLMConfig, LlamaCppLLM, stage_llm_config
from omnilite.runtime.metrics import relative_l2_error, relative_max_error, snr_db
from omnilite.runtime.onnx_session import SessionOptions

from .accuracy import (AccuracyOptions, _judge, _same_file, _stage_of, audio_comparison, encoder_report, fixed_units,
                       kl_divergence, log_mel_distance_db, sequence_agreement)

log = logging.getLogger(__name__)

MIN_CODES = 20  # fewer reference codes than this: the flow and HiFT get a fixed seeded sequence


@dataclass
class Trace:
    """What one pipeline reply evaluated: LLM calls (ids, rows or None, last logits), where the clip's
    rows were, head steps (hidden, text rows, logits (group, codebook), codes), and the reply."""

    llm_calls: list[tuple[list[int], np.ndarray | None, np.ndarray]] = field(default_factory=list)
    rows_call: int = -1
    head_steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]] = field(default_factory=list)
    done: Done | None = None


def _traced_reply(bundle: Bundle, speech: np.ndarray, tokens: int, threads: int | None) -> Trace:
    trace = Trace()
    config = FunAudioChatConfig(max_new_tokens=tokens, ignore_eos=True, mode="sequential", threads=threads)
    with Pipeline.load(bundle.path, config) as pipe:
        llm_eval, head_step = pipe._eval, pipe.head.step

        def record_eval(ids, rows=None):
            logits = llm_eval(ids, rows)
            if rows is not None and trace.rows_call < 0:
                trace.rows_call = len(trace.llm_calls)
            trace.llm_calls.append((list(ids), None if rows is None else np.array(rows, np.float32), np.array(logits)))
            return logits

        def record_step(hidden, text, choose=None):
            codes = head_step(hidden, text, choose)
            trace.head_steps.append((np.array(hidden, np.float32), np.array(text, np.float32), np.array(pipe.head.logits), list(codes)))
            return codes

        pipe._eval, pipe.head.step = record_eval, record_step
        trace.done = [e for e in pipe.respond(speech, 16000) if isinstance(e, Done)][0]
    return trace


def _llm_metrics(quantized: Bundle, trace: Trace, threads: int | None) -> dict:
    """The reference evaluations replayed on the quantized LLM; compared from the suffix on."""
    n_ctx = sum(len(ids) for ids, _, _ in trace.llm_calls) + 16
    ref, test = [], []
    with LlamaCppLLM(quantized.file("llm"), stage_llm_config(quantized, "llm", n_ctx=max(512, n_ctx), n_threads=threads)) as llm:
        for i, (ids, rows, logits) in enumerate(trace.llm_calls):
            out = llm.eval_tokens(ids, want_last=True) if rows is None else llm.eval_embeddings(rows, want_last=True)
            if i > trace.rows_call:
                ref.append(logits)
                test.append(out[0])
    ref_l, test_l = np.stack(ref), np.stack(test)
    kl = kl_divergence(ref_l, test_l)
    return {"top1_agreement": float(np.mean(np.argmax(ref_l, -1) == np.argmax(test_l, -1))), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "positions": len(ref)}


def _head_metrics(quantized: Bundle, trace: Trace, ort_opts: SessionOptions, threads: int | None) -> dict:
    """The reference head steps replayed on the quantized head, teacher-forced on the reference codes."""
    spec = HeadSpec.from_bundle(quantized)
    cfg = stage_llm_config(quantized, "speech_head")
    n_ctx = spec.group * (sum(len(h) for h, _, _, _ in trace.head_steps) + 1)
    head = SpeechHead(quantized.path, spec, LLMConfig(n_ctx=n_ctx, kv_cache=cfg.kv_cache, flash_attn=cfg.flash_attn,
                                                      n_threads=threads), ort_opts)
    try:
        head.reset()
        test = []
        for hidden, text, _, codes in trace.head_steps:
            forced = iter(codes)
            head.step(hidden, text, lambda _lo, _seen: next(forced))
            test.append(head.logits)
    finally:
        head.close()
    ref_l = np.concatenate([lo for _, _, lo, _ in trace.head_steps])
    test_l = np.concatenate(test)
    kl = kl_divergence(ref_l, test_l)
    return {"top1_agreement": float(np.mean(np.argmax(ref_l, -1) == np.argmax(test_l, -1))), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "code_positions": int(len(ref_l))}


def fun_audio_chat_sections(quantized: Bundle, reference: Bundle, speech: np.ndarray, ort_opts: SessionOptions,
                            options: AccuracyOptions) -> tuple[dict, dict, dict]:
    """(stage reports, end-to-end fields, input fields) for a Fun-Audio-Chat bundle."""
    stages: dict[str, dict] = {}
    overrides, threads = options.tolerances, options.threads
    prec = {s.name: s.precision for s in quantized.stages.values()}

    # Encoder (audio input stage) ---------------------------------------------------------------
    enc_ref = FunAudioChatEncoder(reference, ort_opts)
    clip = enc_ref.mel(speech)
    rows_ref = enc_ref.embed(clip)
    same_enc = _same_file(quantized, reference, _stage_of(quantized, "encoder"))
    rows_q = rows_ref if same_enc else FunAudioChatEncoder(quantized, ort_opts).embed(clip)
    stages["encoder"] = encoder_report(quantized, rows_ref, rows_q, same_enc, overrides)

    # LLM and speech head, replayed on the reference reply ----------------------------------------
    trace = _traced_reply(reference, speech, int(options.tokens), threads)
    st = _stage_of(quantized, "llm")
    same = _same_file(quantized, reference, st)
    metrics = {"top1_agreement": 1.0, "mean_kl": 0.0} if same else _llm_metrics(quantized, trace, threads)
    stages["llm"] = {"stage": st, **_judge("llm", prec[st], metrics, overrides, same)}
    log.info("accuracy: llm %s", metrics)
    st = _stage_of(quantized, "tts")
    same = all(_same_file(quantized, reference, s) for s in (st, "speech_head_input", "speech_head_codes"))
    metrics = {"top1_agreement": 1.0, "mean_kl": 0.0} if same else _head_metrics(quantized, trace, ort_opts, threads)
    stages["tts"] = {"stage": st, **_judge("tts", prec[st], metrics, overrides, same)}
    log.info("accuracy: speech head %s", metrics)

    # Flow ----------------------------------------------------------------------------------------
    voc_ref = OnnxVocoder(reference.path, ort_opts)
    same_flow = all(_same_file(quantized, reference, s) for s in ("flow_encoder", "flow_estimator", "flow_noise"))
    same_voc = all(_same_file(quantized, reference, s) for s in ("hift", "hift_f0"))
    voc_q = voc_ref if same_flow and same_voc else OnnxVocoder(quantized.path, ort_opts)
    codes_ref = list(trace.done.units)
    enough = len(codes_ref) >= MIN_CODES
    codes = codes_ref if enough else fixed_units(60, vocab=int(reference["speech"]["vocoder_codes"]))
    mel_ref = voc_ref.mel(codes)
    mel_q = mel_ref if same_flow else voc_q.mel(codes)
    metrics = {"mel_rel_error": relative_l2_error(mel_ref, mel_q),
               "mel_rel_max_error": relative_max_error(mel_ref, mel_q), "codes": len(codes),
               "codes_source": "reference reply" if enough else f"fixed sequence (the reference reply held {len(codes_ref)} codes)"}
    st = _stage_of(quantized, "flow")
    stages["flow"] = {"stage": st, **_judge("flow", prec[st], metrics, overrides, same_flow)}
    log.info("accuracy: flow mel relative error %.4f", metrics["mel_rel_error"])

    # Vocoder (HiFT) ------------------------------------------------------------------------------
    rate = int(reference["audio"]["output_sample_rate"])
    wav_ref = voc_ref.audio(mel_ref)
    wav_q = wav_ref if same_voc else voc_q.audio(mel_ref)
    metrics = {"snr_db": snr_db(wav_ref, wav_q), "log_mel_distance_db": log_mel_distance_db(wav_ref, wav_q, rate),
               "audio_seconds": round(len(wav_ref) / rate, 3)}
    st = _stage_of(quantized, "vocoder")
    stages["vocoder"] = {"stage": st, **_judge("vocoder", prec[st], metrics, overrides, same_voc)}
    log.info("accuracy: vocoder SNR %.1f dB", metrics["snr_db"])

    # End to end (informational): the quantized bundle's own reply --------------------------------
    done_ref = trace.done
    done_q = _traced_reply(quantized, speech, int(options.tokens), threads).done
    end_to_end = {"text_identical": done_ref.text == done_q.text, "text_quantized": done_q.text[:160],
                  "unit_agreement": sequence_agreement(codes_ref, list(done_q.units)),
                  **audio_comparison(done_ref.audio, done_q.audio, rate)}
    inputs = {"positions": int(len(rows_ref)), "codes_reference": len(codes_ref), "codes_quantized": len(done_q.units)}
    return stages, end_to_end, inputs
