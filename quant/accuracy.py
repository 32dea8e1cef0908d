"""Accuracy of a quantized bundle against its unquantized source, stage by stage, on fixed inputs.

Every stage is measured *in isolation*: it gets the reference bundle's upstream outputs, so an
error is charged to the stage that made it (a flipped LLM token would otherwise change every
unit and sample downstream). Then the whole quantized chain runs end to end against the whole
reference chain; that section is informational, because with random weights one flipped token
sends the rest of the reply elsewhere.

Fixed inputs: the packaged spoken question (``omnilite/data/question.wav``) in the encoder's exact
mode (30 s padding, as trained); the LLM gets the reference speech embeddings inside the real
prompt and is teacher-forced on the reference's greedy reply; the speech decoder gets the
reference LLM's hidden states; the vocoder gets the reference units.

Per stage (role):
* encoder: row cosine of the speech embeddings (min, mean), relative RMS and max error;
* llm: top-1 agreement and mean KL(reference || quantized) of the next-token distributions over
  the teacher-forced reply (llama.cpp logits), cosine of the hidden states the speech decoder
  reads, and whether the greedy reply (text) changes;
* decoder: relative error of the per-frame unit/blank logits (judged), agreement of the per-frame
  predictions and of the collapsed units (reported: argmax over near-tied random-weight classes flips);
* vocoder: duration agreement, waveform SNR and log-mel distance of the audio.

The encoder and LLM sections are shared by every family; LLaMA-Omni2's TTS LM, flow and HiFT
sections are in `accuracy_omni2`; Step-Audio 2 (its own 25 s-piece front end, LLM prompt
and token2wav) is in `accuracy_step_audio2`.

Torch-free: numpy, onnxruntime and llama.cpp only (the runtime's stage classes).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import omnilite
from omnilite.runtime.audio import prepare_speech, read_wav
from omnilite.runtime.bundle import Bundle
from omnilite.runtime.encoder import SpeechEncoder
from omnilite.runtime.llm import LlamaCppLLM, stage_llm_config
from omnilite.runtime.mel import mel_filters
from omnilite.runtime.metrics import cosine_rows, relative_max_error, snr_db
from omnilite.runtime.onnx_session import SessionOptions
from omnilite.runtime.units import ctc_collapse
from omnilite.runtime.vocoder import UnitVocoder

from .presets import FAMILY_ROLES, tolerance

log = logging.getLogger(__name__)

QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"  # in the source tree and the wheel alike


@dataclass(frozen=True)
class AccuracyOptions:
    tokens: int = 32  # teacher-forced / greedy reply length
    threads: int | None = None
    tolerances: dict[str, float] = field(default_factory=dict)  # {"role.metric": value} overrides
    audio: Path | None = None  # default: the packaged question


# --- metrics ----------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_test) in nats, per row."""
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def edit_distance(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def sequence_agreement(a: list[int], b: list[int]) -> float:
    """1 - edit distance / longer length (1.0 for two empty sequences)."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1.0 - edit_distance(a, b) / n


def _log_mel_db(audio: np.ndarray, filters: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    x = np.pad(np.asarray(audio, np.float64), (n_fft // 2, n_fft // 2))
    n = 1 + max(0, len(x) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(x, (n, n_fft), (x.strides[0] * hop, x.strides[0]), writeable=False)
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2
    return filters @ power.T


def log_mel_distance_db(reference: np.ndarray, test: np.ndarray, sample_rate: int = 16000, n_mels: int = 80) -> float:
    """Mean absolute difference of 80-bin log-mel spectrograms in dB (64 ms windows, 16 ms hop at
    16 kHz), floored 80 dB below the reference's peak so silence does not dominate; the shorter
    signal is zero-padded (a length change counts as error)."""
    n_fft = 1024 if sample_rate >= 16000 else 512
    hop = n_fft // 4
    length = max(len(reference), len(test), n_fft)
    ref = np.zeros(length)
    out = np.zeros(length)
    ref[: len(reference)] = reference
    out[: len(test)] = test
    filters = mel_filters(n_mels, sample_rate, n_fft).astype(np.float64)
    a, b = _log_mel_db(ref, filters, n_fft, hop), _log_mel_db(out, filters, n_fft, hop)
    floor = max(float(a.max()), 1e-20) * 1e-8
    return float(np.mean(np.abs(10 * np.log10(np.maximum(a, floor)) - 10 * np.log10(np.maximum(b, floor)))))


# --- the report -------------------------------------------------------------------------------

def _stage_of(bundle: Bundle, role: str) -> str:
    return FAMILY_ROLES[bundle.family][role][0]


def _same_file(a: Bundle, b: Bundle, stage: str) -> bool:
    return a.stages[stage].sha256 == b.stages[stage].sha256


def _judge(role: str, precision: str, metrics: dict, overrides: dict[str, float], identical: bool) -> dict:
    tol = tolerance(role, precision, overrides)
    failed = [] if identical else tol.check(metrics)
    return {"precision": precision, "identical_file": identical, "metrics": metrics,
            "tolerance": tol.as_dict(), "ok": not failed, "failed_metrics": failed}


def greedy_with_logits(llm: LlamaCppLLM, first, n: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Greedy reply of n tokens (eos ignored, so the length is fixed) with the logits and hidden
    state of the position that predicted each token."""
    logits, hidden = first
    tokens, all_logits, all_hidden = [], [], []
    for i in range(n):
        token = int(np.argmax(logits))
        tokens.append(token)
        all_logits.append(logits)
        all_hidden.append(hidden)
        if i < n - 1:
            logits, hidden = llm.eval_tokens([token], want_last=True)
    return tokens, np.stack(all_logits), np.stack(all_hidden)


def teacher_forced(llm: LlamaCppLLM, first, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    logits, hidden = first
    all_logits, all_hidden = [logits], [hidden]
    for token in tokens[:-1]:
        logits, hidden = llm.eval_tokens([token], want_last=True)
        all_logits.append(logits)
        all_hidden.append(hidden)
    return np.stack(all_logits), np.stack(all_hidden)


def _prefill(llm: LlamaCppLLM, prompt: dict, embeds: np.ndarray):
    llm.reset()
    llm.eval_tokens(prompt["prefix_ids"])
    llm.eval_embeddings(embeds)
    return llm.eval_tokens(prompt["suffix_ids"], want_last=True)


def _open_llm(bundle: Bundle, n_ctx: int, threads: int | None) -> LlamaCppLLM:
    # The KV cache type and attention kernel the runtime uses for this bundle.
    return LlamaCppLLM(bundle.file("llm"), stage_llm_config(bundle, "llm", n_ctx=n_ctx, n_threads=threads))


def until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(t)
    return out


class FrameScorer:
    """The speech decoder's graph with the input of its final ArgMax (the per-frame unit/blank
    logits) as an extra output, run chunk by chunk with the KV cache as the runtime does. The
    judged metrics read the logits: the argmax of a random-weight decoder over 1001 nearly tied
    classes flips with any rounding change, the logits themselves do not."""

    def __init__(self, bundle: Bundle, ort_opts: SessionOptions, workdir: Path):
        import onnx

        from omnilite.runtime.onnx_session import open_session

        from .onnx_quant import save_model

        cfg = bundle["speech_generator"]
        model = onnx.load(str(bundle.file("speech_generator")))
        argmax = [n for n in model.graph.node if n.op_type == "ArgMax"][-1]
        # Cast: an fp16 graph's logits are float16 inside (its inputs and outputs stay float32).
        model.graph.node.append(onnx.helper.make_node("Cast", [argmax.input[0]], ["omnilite_logits"],
                                                      to=onnx.TensorProto.FLOAT))
        model.graph.output.append(onnx.helper.make_tensor_value_info("omnilite_logits", onnx.TensorProto.FLOAT, None))
        path = workdir / f"{id(self)}.onnx"
        save_model(model, path)
        self.session = open_session(path, ort_opts)
        self.cache_shape = (int(cfg["layers"]), 1, int(cfg["heads"]), 0, int(cfg["head_dim"]))

    def __call__(self, hidden: np.ndarray, omega: int) -> tuple[np.ndarray, np.ndarray]:
        """(per-frame predictions, per-frame logits) for `hidden`, fed `omega` states at a time."""
        key = value = np.zeros(self.cache_shape, np.float32)
        preds, logits = [], []
        for a in range(0, len(hidden), omega):
            p, key, value, z = self.session.run(None, {"hidden": np.ascontiguousarray(hidden[a:a + omega], np.float32)[None],
                                                       "past_key": key, "past_value": value})
            preds.append(p[0])
            logits.append(z.reshape(len(p[0]), -1))
        if not preds:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate(preds), np.concatenate(logits)


def logit_rel_error(ref: np.ndarray, test: np.ndarray) -> float:
    """||test - ref|| / ||ref|| of row-centred logits (softmax ignores a shift of a row)."""
    r, t = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    r, t = r - r.mean(axis=-1, keepdims=True), t - t.mean(axis=-1, keepdims=True)
    return float(np.linalg.norm(t - r) / max(np.linalg.norm(r), 1e-30))


def fixed_units(n: int = 60, seed: int = 7, vocab: int = 1000) -> list[int]:
    """A fixed unit sequence for the vocoder when the reference decoder yields too few units."""
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@dataclass
class ChainRun:
    """What the speech stages of every family read from the encoder and LLM sections: the
    reference chain's LLM reply and the quantized chain's (for the end-to-end section)."""

    ort_opts: SessionOptions
    overrides: dict[str, float]
    precisions: dict[str, str]
    tokens: int
    tok_ref: list[int]
    hidden_ref: np.ndarray
    tok_e2e: list[int]
    hidden_e2e: np.ndarray


def _encoder_section(quantized: Bundle, reference: Bundle, speech: np.ndarray, ort_opts: SessionOptions,
                     overrides: dict[str, float]) -> tuple[dict, np.ndarray, np.ndarray]:
    st = _stage_of(quantized, "encoder")
    enc_ref = SpeechEncoder(reference, ort_opts)
    mel = enc_ref.mel(speech, "exact")
    emb_ref = enc_ref.embed(mel)
    del enc_ref
    same = _same_file(quantized, reference, st)
    emb_q = emb_ref if same else SpeechEncoder(quantized, ort_opts).embed(mel)
    return encoder_report(quantized, emb_ref, emb_q, same, overrides), emb_ref, emb_q


def encoder_report(quantized: Bundle, emb_ref: np.ndarray, emb_q: np.ndarray, same: bool, overrides: dict[str, float]) -> dict:
    """The encoder stage's report from the two encoders' speech embeddings (positions, dim)."""
    cos = cosine_rows(emb_ref, emb_q)
    metrics = {
        "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
        "rel_rms_error": float(np.sqrt(np.mean((emb_q.astype(np.float64) - emb_ref) ** 2) / max(np.mean(emb_ref.astype(np.float64) ** 2), 1e-30))),
        "rel_max_error": relative_max_error(emb_ref, emb_q),
        "positions": int(emb_ref.shape[0]),
    }
    log.info("accuracy: encoder %s", metrics)
    st = _stage_of(quantized, "encoder")
    return {"stage": st, **_judge("encoder", quantized.stages[st].precision, metrics, overrides, same)}


def _llm_section(quantized: Bundle, reference: Bundle, emb_ref: np.ndarray, emb_q: np.ndarray, same_enc: bool,
                 options: AccuracyOptions) -> tuple[dict, dict, tuple]:
    """(llm stage report, end-to-end text fields, (tok_ref, hidden_ref, tok_e2e, hidden_e2e))."""
    st = _stage_of(quantized, "llm")
    n = int(options.tokens)
    prompt = reference["llm"]["prompt"]
    eos = frozenset(reference["llm"]["eos_ids"])
    n_ctx = max(512, len(prompt["prefix_ids"]) + len(emb_ref) + len(prompt["suffix_ids"]) + n + 16)
    with _open_llm(reference, n_ctx, options.threads) as llm:
        tok_ref, logits_ref, hidden_ref = greedy_with_logits(llm, _prefill(llm, prompt, emb_ref), n)
        text_ref = llm.detokenize(until_eos(tok_ref, eos))
    same_llm = _same_file(quantized, reference, st)
    logits_q, hidden_q, tok_greedy, hidden_greedy, text_q = logits_ref, hidden_ref, tok_ref, hidden_ref, text_ref
    tok_e2e, hidden_e2e, text_e2e = tok_ref, hidden_ref, text_ref
    if not (same_llm and same_enc):
        with _open_llm(quantized, n_ctx, options.threads) as llm:
            if not same_llm:
                logits_q, hidden_q = teacher_forced(llm, _prefill(llm, prompt, emb_ref), tok_ref)
                tok_greedy, _, hidden_greedy = greedy_with_logits(llm, _prefill(llm, prompt, emb_ref), n)
                text_q = llm.detokenize(until_eos(tok_greedy, eos))
            if same_enc:  # the quantized chain sees the reference embeddings: its reply is the greedy one
                tok_e2e, hidden_e2e = tok_greedy, hidden_greedy
            else:
                tok_e2e, _, hidden_e2e = greedy_with_logits(llm, _prefill(llm, prompt, emb_q), n)
            text_e2e = llm.detokenize(until_eos(tok_e2e, eos))
    kl = kl_divergence(logits_ref, logits_q)
    g_ref, g_q = until_eos(tok_ref, eos), until_eos(tok_greedy, eos)
    divergence = next((i for i, (a, b) in enumerate(zip(tok_ref, tok_greedy)) if a != b), None)
    metrics = {
        "top1_agreement": float(np.mean(np.argmax(logits_q, axis=-1) == np.asarray(tok_ref))),
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "hidden_cosine_min": float(cosine_rows(hidden_ref, hidden_q).min()),
        "greedy_text_changed": g_ref != g_q,
        "greedy_first_divergence": divergence,
        "text_reference": text_ref[:160], "text_quantized": text_q[:160],
        "tokens": n,
    }
    log.info("accuracy: llm top1 %.3f KL %.4f", metrics["top1_agreement"], metrics["mean_kl"])
    report = {"stage": st, **_judge("llm", quantized.stages[st].precision, metrics, options.tolerances, same_llm)}
    end_to_end = {
        "text_identical": g_ref == until_eos(tok_e2e, eos),
        "tokens_agreeing_prefix": next((i for i, (a, b) in enumerate(zip(tok_ref, tok_e2e)) if a != b), n),
        "text_quantized": text_e2e[:160],
    }
    return report, end_to_end, (tok_ref, hidden_ref, tok_e2e, hidden_e2e)


def measure_accuracy(quantized: Bundle, reference: Bundle, options: AccuracyOptions = AccuracyOptions()) -> dict:
    """The accuracy report of `quantized` against `reference` (same family and architecture)."""
    if quantized.family != reference.family:
        raise ValueError(f"cannot compare a {quantized.family} bundle with a {reference.family} one")
    t_start = time.perf_counter()
    audio_path = Path(options.audio or QUESTION)
    audio, rate = read_wav(audio_path)
    speech = prepare_speech(audio, rate, 16000, source=str(audio_path))
    ort_opts = SessionOptions(intra_op_threads=options.threads or 0)
    if quantized.family == "step-audio2":  # its own front end (25 s pieces) and token2wav
        from .accuracy_step_audio2 import step_audio2_sections

        stages, end_to_end, input_extra = step_audio2_sections(quantized, reference, speech, ort_opts, options)
    elif quantized.family == "fun-audio-chat":  # its own S2M loop: the head's codes feed the LLM back
        from .accuracy_fun_audio_chat import fun_audio_chat_sections

        stages, end_to_end, input_extra = fun_audio_chat_sections(quantized, reference, speech, ort_opts, options)
    else:
        stages, end_to_end, input_extra = _whisper_family_sections(quantized, reference, speech, ort_opts, options)
    end_to_end["note"] = "whole quantized chain vs whole reference chain; not judged: one changed token changes the rest"
    failed = [role for role, rep in stages.items() if not rep["ok"]]
    return {
        "reference": {"path": str(reference.path), "precisions": {s.name: s.precision for s in reference.stages.values()}},
        "input": {"audio": audio_path.name, "seconds": round(len(speech) / 16000, 2), "encoder_mode": "exact",
                  "tokens": int(options.tokens), **input_extra},
        "stages": stages,
        "end_to_end": end_to_end,
        "ok": not failed,
        "failed": failed,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _whisper_family_sections(quantized: Bundle, reference: Bundle, speech: np.ndarray, ort_opts: SessionOptions,
                             options: AccuracyOptions) -> tuple[dict, dict, dict]:
    """LLaMA-Omni and LLaMA-Omni2 (Whisper front end, one embedding block): (stages, end-to-end, input fields)."""
    stages: dict[str, dict] = {}
    stages["encoder"], emb_ref, emb_q = _encoder_section(quantized, reference, speech, ort_opts, options.tolerances)
    stages["llm"], end_to_end, (tok_ref, hidden_ref, tok_e2e, hidden_e2e) = _llm_section(
        quantized, reference, emb_ref, emb_q, stages["encoder"]["identical_file"], options)
    run = ChainRun(ort_opts, options.tolerances, {s.name: s.precision for s in quantized.stages.values()},
                   int(options.tokens), tok_ref, hidden_ref, tok_e2e, hidden_e2e)
    if quantized.family == "llama-omni2":
        from .accuracy_omni2 import speech_sections
    else:
        speech_sections = _llama_omni_speech
    speech_stages, audio_e2e, input_extra = speech_sections(quantized, reference, run)
    stages.update(speech_stages)
    end_to_end.update(audio_e2e)
    return stages, end_to_end, input_extra


def audio_comparison(audio_ref: np.ndarray, audio_q: np.ndarray, rate: int) -> dict:
    """The end-to-end audio fields: SNR and log-mel distance of the two chains' replies."""
    some = bool(len(audio_ref) or len(audio_q))
    return {
        "audio_snr_db": snr_db(audio_ref, audio_q) if some else float("inf"),
        "audio_log_mel_distance_db": log_mel_distance_db(audio_ref, audio_q, rate) if some else 0.0,
        "audio_seconds_reference": round(len(audio_ref) / rate, 3),
        "audio_seconds_quantized": round(len(audio_q) / rate, 3),
    }


def _llama_omni_speech(quantized: Bundle, reference: Bundle, run: ChainRun) -> tuple[dict, dict, dict]:
    """LLaMA-Omni's CTC speech decoder and unit vocoder: (stage reports, end-to-end audio fields, input fields)."""
    ort_opts, overrides, prec = run.ort_opts, run.overrides, run.precisions
    stages: dict[str, dict] = {}
    # Speech decoder --------------------------------------------------------------------------
    st = _stage_of(quantized, "decoder")
    omega = int(reference["streaming"]["omega"])
    blank = int(reference["speech_generator"]["blank"])
    same = _same_file(quantized, reference, st)
    with tempfile.TemporaryDirectory(prefix="omnilite-accuracy-") as tmp:
        scorer_ref = FrameScorer(reference, ort_opts, Path(tmp))
        scorer_q = scorer_ref if same else FrameScorer(quantized, ort_opts, Path(tmp))
        frames_ref, logits_ref = scorer_ref(run.hidden_ref, omega)
        frames_q, logits_q = (frames_ref, logits_ref) if same else scorer_q(run.hidden_ref, omega)
        units_e2e = ctc_collapse(scorer_q(run.hidden_e2e, omega)[0], blank, None)
        del scorer_ref, scorer_q
    units_ref = ctc_collapse(frames_ref, blank, None)
    units_q = ctc_collapse(frames_q, blank, None)
    metrics = {
        "logit_rel_error": logit_rel_error(logits_ref, logits_q),
        "frame_agreement": float(np.mean(frames_ref == frames_q)) if len(frames_ref) else 1.0,
        "unit_agreement": sequence_agreement(units_ref, units_q),
        "units_identical": units_ref == units_q,
        "units_reference": len(units_ref), "units_quantized": len(units_q), "frames": int(len(frames_ref)),
    }
    stages["decoder"] = {"stage": st, **_judge("decoder", prec[st], metrics, overrides, same)}
    log.info("accuracy: decoder logit relative error %.4f, frame agreement %.3f", metrics["logit_rel_error"],
             metrics["frame_agreement"])

    # Vocoder (duration predictor + HiFi-GAN) --------------------------------------------------
    st = _stage_of(quantized, "vocoder")
    voc_ref = UnitVocoder(reference, ort_opts)
    same = _same_file(quantized, reference, st) and _same_file(quantized, reference, "unit_duration")
    voc_q = voc_ref if same else UnitVocoder(quantized, ort_opts)
    voc_units = units_ref if len(units_ref) >= 10 else fixed_units()
    u = np.asarray(voc_units, np.int64)
    dur_ref, dur_q = voc_ref.durations(u), voc_q.durations(u)
    frames = np.repeat(u, dur_ref)
    wav_ref = voc_ref.generate(frames)
    wav_q = wav_ref if same else voc_q.generate(frames)
    rate_out = voc_ref.sample_rate
    metrics = {
        "snr_db": snr_db(wav_ref, wav_q),
        "log_mel_distance_db": log_mel_distance_db(wav_ref, wav_q, rate_out),
        "duration_agreement": float(np.mean(dur_ref == dur_q)),
        "units": len(voc_units), "units_source": "reference decoder" if voc_units is units_ref else "fixed sequence (reference decoder gave < 10)",
        "audio_seconds": round(len(wav_ref) / rate_out, 3),
    }
    stages["vocoder"] = {"stage": st, **_judge("vocoder", prec[st], metrics, overrides, same)}
    log.info("accuracy: vocoder SNR %.1f dB", metrics["snr_db"])

    # End to end (informational) ----------------------------------------------------------------
    audio_e2e = {"unit_agreement": sequence_agreement(units_ref, units_e2e),
                 **audio_comparison(voc_ref.offline(units_ref), voc_q.offline(units_e2e), rate_out)}
    return stages, audio_e2e, {"omega": omega}


# --- printing ---------------------------------------------------------------------------------

_SHOW = {
    "encoder": ("cosine_min", "cosine_mean", "rel_rms_error", "rel_max_error"),
    "llm": ("top1_agreement", "mean_kl", "max_kl", "hidden_cosine_min", "greedy_text_changed"),
    "decoder": ("logit_rel_error", "frame_agreement", "unit_agreement", "units_identical"),
    "tts": ("top1_agreement", "mean_kl", "max_kl", "greedy_token_agreement"),
    "flow": ("mel_rel_error", "mel_rel_max_error", "mel_cosine_min", "stream_mel_rel_error"),
    "vocoder": ("snr_db", "log_mel_distance_db", "duration_agreement"),
}


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.4g}"
    return str(v)


def format_report(report: dict) -> list[str]:
    """Human-readable lines: one per stage with its verdict, then the end-to-end line."""
    lines = [f"accuracy against {report['reference']['path']} ({report['input']['audio']}, "
             f"{report['input']['tokens']} tokens, {report['seconds']} s):"]
    for role, rep in report["stages"].items():
        verdict = "same" if rep["identical_file"] else ("ok  " if rep["ok"] else "FAIL")
        m = rep["metrics"]
        fields = ", ".join(f"{k}={_fmt(m[k])}" for k in _SHOW.get(role, ()) if k in m)
        tol = ", ".join(f"{k}{_fmt(v)}" for k, v in rep["tolerance"].items())
        line = f"  {verdict} {role:<8} {rep['precision']:<7} {fields}"
        if tol and not rep["identical_file"]:
            line += f"  (tolerance {tol})"
        if rep["failed_metrics"]:
            line += f"  <-- misses {', '.join(rep['failed_metrics'])}"
        lines.append(line)
    e = report["end_to_end"]
    lines.append(f"  end-to-end: text identical={e['text_identical']}, unit agreement={_fmt(e['unit_agreement'])}, "
                 f"audio SNR={_fmt(e['audio_snr_db'])} dB, log-mel distance={_fmt(e['audio_log_mel_distance_db'])} dB")
    return lines
