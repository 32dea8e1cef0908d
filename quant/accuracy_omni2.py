"""LLaMA-Omni2's speech stages in the accuracy report: TTS LM, flow, HiFT (see `accuracy` for the
shared encoder and LLM sections and the principle: each stage gets the reference's upstream outputs).

* tts: the TTS LM (with its fusion and text-embedding table) is fed the reference LLM's tokens and
  hidden states under the bundle's read/write schedule and teacher-forced on the reference's greedy
  TTS tokens, through the runtime's own `TTSWriter`; judged on top-1 agreement and mean
  KL(reference || quantized) of its next-token distributions, like the LLM. The agreement of the
  free-running greedy streams is reported too (one flip changes the rest, so it is not judged);
* flow: the reference units through both flows (fixed noise, so deterministic); judged on the mel's
  relative error ||mel_q - mel_ref|| / ||mel_ref|| of whole-utterance synthesis. The path a reply
  runs, the pipeline's default stream (with the flow cache's stage where the bundle has it, whose
  weights the whole solve never reads), is reported beside it: both bundles' streams on the same
  units in the same writes, ``stream_mel_rel_error``;
* vocoder (HiFT): the reference mel through both; waveform SNR and log-mel distance, as LLaMA-Omni's.
"""

from __future__ import annotations

import logging

import numpy as np

from omnilite.runtime.bundle import Bundle
from omnilite.runtime.llm import stage_llm_config
from omnilite.runtime.metrics import relative_l2_error, relative_max_error, snr_db
from omnilite.runtime.omni2.flow import FlowDecoder
from omnilite.runtime.omni2.hift import HiFTVocoder
from omnilite.runtime.omni2.tts import TTSWriter

from .accuracy import (ChainRun, _judge, _same_file, _stage_of, audio_comparison, fixed_units, kl_divergence,
                       log_mel_distance_db, sequence_agreement)

log = logging.getLogger(__name__)


class _RecordingWriter(TTSWriter):
    """The runtime's TTS writer, keeping the logits of every pick; with `forced`, it writes those
    tokens instead of its own choice (teacher forcing in the runtime's exact feed order)."""

    def start(self, forced: list[int] | None = None) -> None:
        self.reset()
        self.forced = forced
        self.logits: list[np.ndarray] = []

    def _pick(self, logits: np.ndarray) -> int:
        self.logits.append(np.array(logits, np.float32))
        if self.forced is None:
            return super()._pick(logits)
        return self.forced[len(self.logits) - 1]


def _open_writer(bundle: Bundle, run: ChainRun, n_ctx: int) -> _RecordingWriter:
    return _RecordingWriter(bundle, stage_llm_config(bundle, "tts_lm", n_ctx=n_ctx), run.ort_opts)  # as the runtime runs it


def write_all(writer: _RecordingWriter, hidden: np.ndarray, tokens: list[int], read: int, write: int, max_final: int,
              forced: list[int] | None = None) -> list[int]:
    """The whole TTS token stream for one reply: W tokens every R text tokens, the rest after <sep>."""
    writer.start(forced)
    bounds = list(range(0, len(tokens), read)) + [len(tokens)]
    stream: list[int] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        last = b == len(tokens)
        stream += writer.write(hidden[a:b], tokens[a:b], finished=last, max_new=max_final if last else write)
    return stream


def _streamed(flow: FlowDecoder, units: list[int], write: int) -> tuple[np.ndarray, bool]:
    """The pipeline's default flow stream over `units` pushed a write (`write` tokens) at a time:
    (mel, whether it ran on the flow cache)."""
    from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig

    fs = flow.stream(Omni2PipelineConfig().flow)
    mel = [fs.push(units[a:a + write]) for a in range(0, len(units), write)] + [fs.flush()]
    return np.concatenate(mel, axis=1), fs.cache is not None


def _unit_vocab(bundle: Bundle) -> int:
    units = bundle["tts"]["units"]
    return int(units["count"]) if "count" in units else len(units["units"])


def speech_sections(quantized: Bundle, reference: Bundle, run: ChainRun) -> tuple[dict, dict, dict]:
    """(stage reports for tts / flow / vocoder, end-to-end audio fields, input fields)."""
    stages: dict[str, dict] = {}
    read, write = int(reference["streaming"]["read"]), int(reference["streaming"]["write"])
    max_final = 2 * run.tokens  # a cap on the speech after the text: random weights may never say eos
    n_ctx = max(512, run.tokens * (1 + -(-write // read)) + max_final + 16)

    # TTS LM ------------------------------------------------------------------------------------
    st = _stage_of(quantized, "tts")
    same = all(_same_file(quantized, reference, s) for s in ("tts_lm", "tts_text_embed", "tts_fusion"))
    writer_ref = _open_writer(reference, run, n_ctx)
    writer_q = writer_ref if same else _open_writer(quantized, run, n_ctx)
    try:
        stream_ref = write_all(writer_ref, run.hidden_ref, run.tok_ref, read, write, max_final)
        logits_ref = np.stack(writer_ref.logits)
        units_ref = writer_ref.units(stream_ref)
        if same:
            logits_q, stream_q = logits_ref, stream_ref
        else:
            write_all(writer_q, run.hidden_ref, run.tok_ref, read, write, max_final, forced=stream_ref)
            logits_q = np.stack(writer_q.logits)
            stream_q = write_all(writer_q, run.hidden_ref, run.tok_ref, read, write, max_final)
        # The quantized chain's own reply (informational end-to-end section).
        same_chain = same and run.tok_e2e == run.tok_ref
        stream_e2e = stream_ref if same_chain else write_all(writer_q, run.hidden_e2e, run.tok_e2e, read, write, max_final)
        units_e2e = writer_q.units(stream_e2e)
    finally:
        writer_ref.close()
        if writer_q is not writer_ref:
            writer_q.close()
    kl = kl_divergence(logits_ref, logits_q)
    metrics = {
        "top1_agreement": float(np.mean(np.argmax(logits_q, axis=-1) == np.asarray(stream_ref))),
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "greedy_token_agreement": sequence_agreement(stream_ref, stream_q),
        "tts_tokens": len(stream_ref), "units_reference": len(units_ref),
    }
    stages["tts"] = {"stage": st, **_judge("tts", run.precisions[st], metrics, run.overrides, same)}
    log.info("accuracy: tts top1 %.3f KL %.4f", metrics["top1_agreement"], metrics["mean_kl"])

    # Flow ----------------------------------------------------------------------------------------
    st = _stage_of(quantized, "flow")
    same = all(_same_file(quantized, reference, s) for s in ("flow_encoder", "flow_estimator"))
    cached = "flow_estimator_cached"
    same_stream = same and (cached not in reference.stages or _same_file(quantized, reference, cached))
    flow_ref = FlowDecoder(reference, run.ort_opts)
    flow_q = flow_ref if same_stream else FlowDecoder(quantized, run.ort_opts)
    flow_units = units_ref if len(units_ref) >= 10 else fixed_units(vocab=_unit_vocab(reference))
    mel_ref = flow_ref.offline(flow_units)
    mel_q = mel_ref if same else flow_q.offline(flow_units)
    diff = mel_q.astype(np.float64) - mel_ref
    metrics = {
        "mel_rel_error": relative_l2_error(mel_ref, mel_q),
        "mel_rel_max_error": relative_max_error(mel_ref, mel_q),
        "mel_mean_abs_error": float(np.mean(np.abs(diff))),
        "units": len(flow_units),
        "units_source": "reference TTS LM" if flow_units is units_ref else "fixed sequence (reference TTS LM gave < 10)",
        "mel_frames": int(mel_ref.shape[1]),
    }
    mel_ref_s, on_cache = _streamed(flow_ref, flow_units, write)
    mel_q_s, on_cache = (mel_ref_s, on_cache) if same_stream else _streamed(flow_q, flow_units, write)
    metrics.update(stream_mel_rel_error=relative_l2_error(mel_ref_s, mel_q_s), stream_cached=on_cache)
    stages["flow"] = {"stage": st, **_judge("flow", run.precisions[st], metrics, run.overrides, same)}
    log.info("accuracy: flow mel relative error %.4f", metrics["mel_rel_error"])

    # Vocoder (HiFT) ------------------------------------------------------------------------------
    st = _stage_of(quantized, "vocoder")
    same = all(_same_file(quantized, reference, s) for s in ("hift", "hift_f0"))
    voc_ref = HiFTVocoder(reference, run.ort_opts)
    voc_q = voc_ref if same else HiFTVocoder(quantized, run.ort_opts)
    wav_ref = voc_ref.offline(mel_ref)
    wav_q = wav_ref if same else voc_q.offline(mel_ref)
    rate = voc_ref.sample_rate
    metrics = {
        "snr_db": snr_db(wav_ref, wav_q),
        "log_mel_distance_db": log_mel_distance_db(wav_ref, wav_q, rate),
        "audio_seconds": round(len(wav_ref) / rate, 3),
    }
    stages["vocoder"] = {"stage": st, **_judge("vocoder", run.precisions[st], metrics, run.overrides, same)}
    log.info("accuracy: vocoder SNR %.1f dB", metrics["snr_db"])

    # End to end (informational) ------------------------------------------------------------------
    audio_ref = wav_ref if flow_units is units_ref else voc_ref.offline(flow_ref.offline(units_ref))
    audio_q = voc_q.offline(flow_q.offline(units_e2e))
    audio_e2e = {"unit_agreement": sequence_agreement(units_ref, units_e2e),
                 **audio_comparison(audio_ref, audio_q, rate)}
    return stages, audio_e2e, {"read": read, "write": write, "tts_tokens_after_text": max_final}
