"""LLaMA-Omni2 latency benchmark: omnilite (torch-free runtime) vs the PyTorch reference, same run.

For one bundle (and the checkpoint it came from, for the baseline) and a spoken question:

* omnilite, one pipeline alive at a time (closed and garbage-collected before the next loads), with
  the device profile's threads and providers: for each read/write setting in the bundle's default
  encoder mode, plus the first setting in ``exact`` mode (30 s padding, as trained), a warm-up turn
  and then ``--runs`` turns in each of the sequential and overlapped modes, alternating: TTFT, TTFA,
  RTF p50/p95, per-stage busy time (sequential mode, where busy times add up to the wall time) and
  the share of each stage before the first audio sample;
* peak RSS of each omnilite pipeline (the process high-water mark is reset before each load, so a
  row's peak is its own plus whatever the allocator kept from earlier rows; the first row's is
  clean), all taken before torch is imported;
* then, in the same process, the PyTorch baseline in its fastest precision on this host (fp32, and
  bf16 too where the CPU has native bf16; the ratios use the faster: see baseline.py): the
  reference stages in streaming order
  (Whisper on 30 s of padding as the release does, LLM prefill and greedy decoding, every R tokens a
  TTS write with a KV cache (the official code re-runs the TTS LM from scratch, so this baseline is
  faster than the release), and the flow + HiFT on the first chunk + lookahead tokens as the
  official streaming call does) to its first audio sample, with its per-stage times;
* the CPU model, its features (present and absent) and the thread counts, with every result;
* a waterfall PNG of one overlapped turn (first setting, default encoder mode).

Random weights never stop on their own, so replies have a fixed length (``--tokens`` text tokens,
then at most ``--tts-tail`` speech tokens). Results go to ``benchmarks/results/omni2-<name>.json``,
``.md`` and ``.png``; ``--from-json`` re-renders the markdown of a finished run. Text after the
``<!-- notes -->`` line of an existing markdown file (hand-written reading of that run) is kept.

    python -m omnilite.benchmarks.omni2_bench BUNDLE --checkpoint CKPT --name real-0.5B-small --runs 3
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from omnilite.devices.host import describe_cpu
from omnilite.runtime.omni2.flow import FIRST_HOP_TOKENS
from omnilite.runtime.audio import atomic_write_bytes

from .baseline import baseline_result, baseline_sentence, plan_baseline, torch_bf16_view
from .memory import peak_rss_bytes, reset_peak_rss
from .report import write_markdown_keeping_notes
from .turn_stats import percentile as _p
from .turn_stats import stats as _stats

log = logging.getLogger(__name__)

SCHEMA = "omnilite.bench.omni2/3"
RESULTS = Path(__file__).parent / "results"
# Stages of a LLaMA-Omni2 turn as the runtime times them; "vocoder" is flow + HiFT (reported apart).
STAGES = ("resample", "mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "flow", "hift")
TARGETS = {"ttfa_p50_s": 1.0, "rtf_p50": 0.8, "peak_rss_gb": 2.5, "ttfa_speedup_vs_torch": 3.0}


# --- small helpers -----------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
    return reset_peak_rss()


def _peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def _load() -> dict:
    one, five, fifteen = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = ""
    return {"time": time.strftime("%H:%M:%S"), "load1": one, "load5": five, "load15": fifteen, "uptime": uptime}


def _busy_before(done, until: float) -> dict[str, float]:
    """Busy seconds per stage between t0 and `until` (a turn's spans clipped at its first audio)."""
    out: dict[str, float] = {}
    for name, a, b in done.spans:
        if a < until:
            out[name] = out.get(name, 0.0) + min(b, until) - a
    return out


# --- omnilite ----------------------------------------------------------------------------------

def omnilite_row(bundle: Path, base, audio: np.ndarray, rw: tuple[int, int], encoder_mode: str | None, runs: int,
                 bar) -> tuple[dict, object]:
    """One pipeline (one R/W setting and encoder mode): warm-up, then `runs` sequential and overlapped
    turns, alternating so both see the same machine load. Returns the row and one overlapped Done."""
    from omnilite.runtime import Done, Pipeline

    cfg = replace(base, read=rw[0], write=rw[1], encoder_mode=encoder_mode)
    gc.collect()
    _reset_peak_rss()
    t = time.perf_counter()
    pipe = Pipeline.load(bundle, cfg)
    load_s = time.perf_counter() - t
    done: dict[str, list] = {"sequential": [], "overlapped": []}

    def turn(p, mode: str):
        d = [e for e in p.respond(audio, 16000, mode=mode) if isinstance(e, Done)][0]
        bar.update()
        return d

    try:
        turn(pipe, "sequential")  # warm-up (the same sessions serve both modes)
        for _ in range(runs):
            for mode in ("sequential", "overlapped"):
                done[mode].append(turn(pipe, mode))
    finally:
        pipe.close()
        del pipe  # nothing of this pipeline stays alive while the next one loads
        gc.collect()
    row: dict = {"read": rw[0], "write": rw[1], "encoder_mode": encoder_mode or "default", "load_s": load_s,
                 "peak_rss_mb": _peak_rss_mb()}
    for mode, ds in done.items():
        row[mode] = {k: _stats([d.timings[k] for d in ds]) for k in ("ttft", "ttfa", "rtf", "total")}
    seq = done["sequential"]
    row["stages"] = {s: _stats([d.timings.get(s, 0.0) for d in seq]) for s in STAGES + ("vocoder",)}
    before = [_busy_before(d, d.timings["ttfa"]) for d in seq]
    row["before_first_audio"] = {s: _p([b.get(s, 0.0) for b in before], 50) for s in STAGES}
    first = seq[0]
    row["reply"] = {"text_tokens": len(first.tokens), "speech_units": len(first.units),
                    "audio_s": len(first.audio) / first.sample_rate,
                    "prompt_tokens": first.stats.get("prompt_tokens")}
    return row, done["overlapped"][-1]


# --- PyTorch baseline --------------------------------------------------------------------------

# Stage precisions of the bf16 baseline: what a user would run in bf16 on a CPU with native bf16. The
# transformers hold bf16 weights; the flow keeps fp32 weights under bf16 autocast (its fp32 time and
# position embeddings meet its layer norms, which refuse mixed dtypes; autocast casts each weight once
# per answer); HiFT stays fp32, as CosyVoice keeps it even in its half-precision mode.
BF16_STAGE_PRECISIONS = {"encoder": "bf16", "llm": "bf16", "speech_generator": "bf16",
                         "flow": "bf16 (autocast, fp32 weights)", "hift": "fp32"}


def _reference(checkpoint: Path, audio: np.ndarray, precision: str, speech_encoder: Path | None = None,
               decoder: Path | None = None):
    """The reference pipeline with every stage loaded, its bf16 stages cast for a bf16 baseline."""
    import torch

    from omnilite.export.omni2.checkpoint import Omni2Checkpoint
    from omnilite.export.omni2.reference import Omni2ReferencePipeline

    ref = Omni2ReferencePipeline(Omni2Checkpoint.open(checkpoint, speech_encoder, decoder), audio)
    modules = {"encoder": ref.encoder, "llm": ref.llm, "speech_generator": ref.generator, "flow": ref.flow,
               "hift": ref.hift}  # load every stage before timing
    if precision == "bf16":
        for name, stage_precision in BF16_STAGE_PRECISIONS.items():
            if stage_precision == "bf16":
                modules[name].to(torch.bfloat16)
    return ref


def _first_audio(ref, audio: np.ndarray, rw: tuple[int, int], tokens: int, tts_tail: int, precision: str) -> dict:
    """One answer of the reference in streaming order up to its first audio sample: per-stage seconds."""
    import torch

    from omnilite.export.omni2.tts import GreedyTTS, TTSState

    llm, gen, flow, hift = ref.llm, ref.generator, ref.flow, ref.hift
    need = flow.c.chunk_tokens + flow.c.pre_lookahead_len
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    xv = torch.from_numpy(ref.xvector)[None]
    embed = llm.get_input_embeddings()
    s: dict[str, float] = {"llm_decode": 0.0, "speech_generator": 0.0}
    # Autocast lets the fp32 tensors the stages make inside (log-mel, noise, positions) meet bf16 weights.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        t0 = time.perf_counter()
        _, emb = ref.speech_embeddings(audio)  # log-mel + Whisper on 30 s + adapter
        s["encoder"] = time.perf_counter() - t0
        t = time.perf_counter()
        x = torch.cat([embed(torch.tensor([ref.prompt.prefix_ids])), emb[None].to(dtype),
                       embed(torch.tensor([ref.prompt.suffix_ids]))], 1)
        o = llm.model(inputs_embeds=x, use_cache=True)
        past, last = o.past_key_values, o.last_hidden_state[:, -1]
        s["llm_prefill"] = time.perf_counter() - t
        tts, state = GreedyTTS(gen, ref.tts_eos, ref.sep_id), TTSState()
        toks, hid, units, ttft = [], [], [], None
        for step in range(tokens):
            t = time.perf_counter()
            tok = int(llm.lm_head(last).argmax(-1))
            s["llm_decode"] += time.perf_counter() - t
            ttft = ttft or time.perf_counter() - t0
            toks.append(tok)
            hid.append(last[0])
            final = step == tokens - 1
            if len(toks) % rw[0] == 0 or final:
                t = time.perf_counter()
                a = (len(toks) - 1) // rw[0] * rw[0]
                units += ref.units(tts.write(state, torch.stack(hid[a:]), toks[a:], final, rw[1]))
                s["speech_generator"] += time.perf_counter() - t
            if len(units) >= need or final:
                break
            t = time.perf_counter()
            o = llm.model(inputs_embeds=embed(torch.tensor([[tok]])), past_key_values=past, use_cache=True)
            past, last = o.past_key_values, o.last_hidden_state[:, -1]
            s["llm_decode"] += time.perf_counter() - t
        t = time.perf_counter()
        tail = rw[1]  # the final text step wrote the first W of the tail
        while len(units) < need and tail < tts_tail and state.pending != [ref.tts_eos]:  # text done: TTS goes on
            units += ref.units(tts.write(state, torch.zeros(0, hid[0].shape[0], dtype=dtype), [], False, rw[1]))
            tail += rw[1]
        s["speech_generator"] += time.perf_counter() - t
        t = time.perf_counter()  # fewer units than a chunk + lookahead: the speech ended, flush it all
        mel = flow.inference(torch.tensor([units[:need]]), xv, finalize=len(units) < need)
        s["flow"] = time.perf_counter() - t
    with torch.no_grad():  # HiFT stays fp32 (see BF16_STAGE_PRECISIONS)
        t = time.perf_counter()
        hift.inference(mel.float())
        s["hift"] = time.perf_counter() - t
    s["ttfa"] = time.perf_counter() - t0
    s["ttft"] = ttft
    s["text_tokens_before_audio"] = len(toks)
    s["units_before_audio"] = need
    return s


def torch_baseline(checkpoint: Path, audio: np.ndarray, rw: tuple[int, int], tokens: int, tts_tail: int, runs: int,
                   threads: int, bar, precisions: tuple[str, ...] = ("fp32",), speech_encoder: Path | None = None,
                   decoder: Path | None = None) -> dict[str, dict]:
    """The PyTorch reference to its first audio sample in each of `precisions` (all loaded at once, one
    warm-up answer each, then `runs` rounds alternating between them so they share the machine load).
    Returns one summary per precision. `speech_encoder`/`decoder`: where the checkpoint keeps them apart."""
    import torch

    torch.set_num_threads(threads)
    _reset_peak_rss()
    refs, load_s = {}, {}
    for p in precisions:
        t = time.perf_counter()
        refs[p] = _reference(checkpoint, audio, p, speech_encoder, decoder)
        load_s[p] = time.perf_counter() - t
    rows: dict[str, list[dict]] = {p: [] for p in precisions}
    for i in range(runs + 1):  # the first round warms up
        for p in precisions:
            s = _first_audio(refs[p], audio, rw, tokens, tts_tail, p)
            bar.update()
            if i:
                rows[p].append(s)
    keys = ("ttft", "ttfa", "encoder", "llm_prefill", "llm_decode", "speech_generator", "flow", "hift")
    peak = _peak_rss_mb()
    stage_dtypes = {p: BF16_STAGE_PRECISIONS if p == "bf16" else dict.fromkeys(BF16_STAGE_PRECISIONS, "fp32")
                    for p in precisions}
    return {p: {**{k: _stats([r[k] for r in rows[p]]) for k in keys}, "precision": p, "stage_precisions": stage_dtypes[p],
                "read": rw[0], "write": rw[1], "threads": threads, "load_s": load_s[p], "peak_rss_mb": peak,
                "torch": torch.__version__, "text_tokens_before_audio": rows[p][0]["text_tokens_before_audio"],
                "units_before_audio": rows[p][0]["units_before_audio"],
                "note": f"PyTorch {p} reference stages in streaming order to the first audio sample: Whisper on the "
                        "question padded to 30 s (the release), TTS LM with a KV cache (the release re-runs it), flow "
                        "on the first chunk + lookahead tokens, HiFT"
                        + (" (fp32, as CosyVoice keeps it)" if p == "bf16" else "")}
            for p in precisions}


# --- report ------------------------------------------------------------------------------------

def bundle_info(path: Path) -> dict:
    from omnilite.runtime.bundle import load_bundle

    b = load_bundle(path, verify=False)
    stages = {}
    for s in b.stages.values():
        files = [s.file, *s.extra_files]
        stages[s.name] = {"precision": s.precision, "mb": sum((b.path / f).stat().st_size for f in files) / 2**20}
    return {"path": str(path), "family": b.family, "quantization": (b.manifest.get("quantization") or {}).get("preset"),
            "encoder_default_mode": b["encoder"].get("mode"), "stages": stages,
            "mb": sum(f.stat().st_size for f in b.path.iterdir() if f.is_file()) / 2**20}


def targets(result: dict) -> dict:
    row = result["omnilite"][0]  # first R/W setting, default encoder mode (loaded first: its peak is its own)
    got = {"ttfa_p50_s": row["overlapped"]["ttfa"]["p50"], "rtf_p50": row["overlapped"]["rtf"]["p50"],
           "peak_rss_gb": row["peak_rss_mb"] / 1024}
    if "torch" in result:  # the baseline's fastest precision (see baseline.headline)
        got["ttfa_speedup_vs_torch"] = result["torch"]["ttfa"]["p50"] / got["ttfa_p50_s"]
    return {k: {"target": TARGETS[k], "measured": v,
                "met": bool(v >= TARGETS[k]) if k == "ttfa_speedup_vs_torch" else bool(v <= TARGETS[k])}
            for k, v in got.items()}


def markdown(r: dict) -> str:
    b, h = r["bundle"], r["host"]
    rows = r["omnilite"]
    loads = " -> ".join(f"{x['load1']:.2f}/{x['load5']:.2f}/{x['load15']:.2f} ({x['time']})" for x in r["load"].values())
    # Results written before schema 3 have no CPU record or baseline precision (that baseline was fp32).
    cpu = f"- CPU: {describe_cpu(h['cpu_record'])}" if "cpu_record" in h else "- CPU features: not recorded (older result)"
    lines = [
        f"# LLaMA-Omni2 benchmark: {r['name']}", "",
        "Random weights in the released 0.5B layout: the reply is babble of a forced length, timings are real.", "",
        cpu,
        f"- host: {h['cpu']}, {h['cores']} cores, profile **{h['profile']}** (threads {h['stage_threads']}"
        + (f"; PyTorch baseline {h['torch_threads']}" if "torch_threads" in h else "") + "); "
        f"omnilite {r['versions']['omnilite']}, onnxruntime {r['versions']['onnxruntime']}, "
        f"llama-cpp-python {r['versions']['llama_cpp_python']}",
        f"- bundle {b['mb']:.0f} MiB (preset {b['quantization'] or 'fp32 (as exported)'}): "
        + ", ".join(f"{k} {v['precision']} {v['mb']:.0f} MiB" for k, v in b["stages"].items()),
        f"- question {Path(r['question']).name}, {r['question_s']:.2f} s; reply {r['tokens']} text tokens, then at most "
        f"{r['tts_tail']} speech tokens; {r['runs']} warm runs per mode after one warm-up, one pipeline alive at a time",
        "- flow streaming: " + (", ".join(f"{k}={v}" for k, v in r.get("flow", {}).items() if v is not None)
                                or "the bundle's chunk, hop = chunk, all left chunks (exact)"),
        f"- load average (1/5/15 min) {loads}", "",
        "## Targets (R/W {0}/{1}, default encoder mode, overlapped)".format(rows[0]["read"], rows[0]["write"]), "",
        "| target | goal | measured | |", "|---|---:|---:|---|"]
    names = {"ttfa_p50_s": "TTFA p50 (s)", "rtf_p50": "RTF p50", "peak_rss_gb": "peak RSS, omnilite (GB)",
             "ttfa_speedup_vs_torch": f"TTFA speed-up vs PyTorch {r.get('torch', {}).get('precision', 'fp32')}"}
    for k, t in r["targets"].items():
        goal = f">= {t['target']:g}x" if k == "ttfa_speedup_vs_torch" else f"<= {t['target']:g}"
        lines.append(f"| {names[k]} | {goal} | {t['measured']:.3f} | {'met' if t['met'] else '**missed**'} |")
    lines += ["", "## Latency per setting", "",
              "| R/W | encoder mode | TTFT p50 | TTFA p50 | TTFA p95 | TTFA seq p50 | RTF p50 | RTF p95 | "
              "audio (s) | peak RSS (MiB) | load (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        o, s = x["overlapped"], x["sequential"]
        lines.append(f"| {x['read']}/{x['write']} | {x['encoder_mode']} | {o['ttft']['p50']:.3f} | {o['ttfa']['p50']:.3f} | "
                     f"{o['ttfa']['p95']:.3f} | {s['ttfa']['p50']:.3f} | {o['rtf']['p50']:.3f} | {o['rtf']['p95']:.3f} | "
                     f"{x['reply']['audio_s']:.2f} | {x['peak_rss_mb']:.0f} | {x['load_s']:.1f} |")
    lines += ["", "Times in seconds; TTFT/TTFA/RTF from the overlapped mode unless marked seq (sequential).", "",
              "## Per-stage breakdown (sequential p50, seconds)", "",
              "Whole turn busy time, and in brackets the part spent before the first audio sample "
              "(what TTFA is made of).", "",
              "| R/W | encoder mode | " + " | ".join(STAGES) + " |", "|---|---|" + "---:|" * len(STAGES)]
    for x in rows:
        cells = [f"{x['stages'][s]['p50']:.3f} ({x['before_first_audio'][s]:.3f})" for s in STAGES]
        lines.append(f"| {x['read']}/{x['write']} | {x['encoder_mode']} | " + " | ".join(cells) + " |")
    if "torch" in r:
        t = r["torch"]
        ours = rows[0]["overlapped"]["ttfa"]["p50"]
        exact = next((x for x in rows if x["encoder_mode"] == "exact"), None)
        tstages = ("encoder", "llm_prefill", "llm_decode", "speech_generator", "flow", "hift")
        precision = t.get("precision", "fp32")
        lines += ["", f"## PyTorch {precision} baseline (R/W {t['read']}/{t['write']}, {t['threads']} threads, same run, "
                      f"torch {t['torch']})", ""]
        if "plan" in t:
            lines += [baseline_sentence(t["plan"], precision, t["why"]), ""]
            if len(t["by_precision"]) > 1:
                lines += ["| precision | TTFT p50 | TTFA p50 | TTFA p95 | stage precisions |", "|---|---:|---:|---:|---|"]
                lines += [f"| {p} | {x['ttft']['p50']:.3f} | {x['ttfa']['p50']:.3f} | {x['ttfa']['p95']:.3f} | "
                          + ", ".join(f"{k} {v}" for k, v in x["stage_precisions"].items()) + " |"
                          for p, x in t["by_precision"].items()]
                lines += ["", "Precisions alternate round by round in one process with all of them loaded.", ""]
        lines += [
                  f"{precision}: TTFT p50 {t['ttft']['p50']:.3f} s, TTFA p50 {t['ttfa']['p50']:.3f} s (p95 {t['ttfa']['p95']:.3f}); "
                  f"peak RSS {t['peak_rss_mb']:.0f} MiB; first audio after {t['text_tokens_before_audio']} text tokens "
                  f"and {t['units_before_audio']} speech tokens. omnilite's overlapped TTFA is "
                  f"**{t['ttfa']['p50'] / ours:.2f}x** faster in the default encoder mode"
                  + (f", {t['ttfa']['p50'] / exact['overlapped']['ttfa']['p50']:.2f}x in exact mode" if exact else "")
                  + f". {t['note']}.", "",
                  "| stage to first audio | torch p50 (s) | omnilite sequential, before first audio (s) | ratio |",
                  "|---|---:|---:|---:|"]
        ob = rows[0]["before_first_audio"]
        ob_stage = {"encoder": ob["resample"] + ob["mel"] + ob["encoder"], **{k: ob[k] for k in tstages[1:]}}
        for k in tstages:
            ratio = t[k]["p50"] / ob_stage[k] if ob_stage[k] > 0 else float("nan")
            lines.append(f"| {k} | {t[k]['p50']:.3f} | {ob_stage[k]:.3f} | {ratio:.2f}x |")
    lines += ["", f"![waterfall]({r['waterfall']})" if r.get("waterfall") else ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(result: dict, path: Path) -> None:
    write_markdown_keeping_notes(path, markdown(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--checkpoint", type=Path, help="the checkpoint the bundle came from (for the PyTorch baseline)")
    ap.add_argument("--question", type=Path, default=Path(__file__).parent / "data" / "speech" / "s08.wav",
                    help="the spoken question (default: a 3.06 s question from the committed speech set)")
    ap.add_argument("--name", default="bench")
    ap.add_argument("--tokens", type=int, default=24, help="text tokens per reply")
    ap.add_argument("--tts-tail", type=int, default=60, help="speech tokens after the text ends")
    ap.add_argument("--runs", type=int, default=3, help="warm turns per mode and setting")
    ap.add_argument("--profile", default=None, help="device profile (default: the detected one)")
    ap.add_argument("--rw", default="3,10;1,5;5,15", help="read,write settings separated by ';' (the first is the headline)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-encoder-mode row")
    ap.add_argument("--flow-chunk", type=int, default=None, help="flow attention chunk in tokens (default: the bundle's)")
    ap.add_argument("--flow-first-hop", type=int, default=FIRST_HOP_TOKENS,
                    help=f"tokens in the flow's first step (default {FIRST_HOP_TOKENS}, CosyVoice2's; 0: the chunk, exact)")
    ap.add_argument("--flow-left-chunks", type=int, default=None,
                    help="earlier flow chunks the estimator sees (flat cost per step; not exact)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--from-json", type=Path, help="only re-render the markdown of this result file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.from_json:
        write_markdown(json.loads(args.from_json.read_text()), args.from_json.with_suffix(".md"))
        return 0
    if args.bundle is None:
        ap.error("a bundle is needed (or --from-json)")

    from tqdm import tqdm

    import llama_cpp
    import onnxruntime

    from omnilite import __version__
    from omnilite.devices.host import detect_host
    from omnilite.devices.profiles import choose_profile, pipeline_settings
    from omnilite.runtime.audio import prepare_speech, read_wav
    from omnilite.runtime.omni2.flow import FlowStreamConfig
    from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig

    from .bench import waterfall_png

    host = detect_host()
    profile, reason = choose_profile(args.profile, host)
    settings = pipeline_settings(profile, host, "llama-omni2")
    settings.pop("omega"), settings.pop("write")  # R/W come from --rw
    flow = FlowStreamConfig(chunk_tokens=args.flow_chunk, first_hop_tokens=args.flow_first_hop or None,
                            left_chunks=args.flow_left_chunks)
    base = Omni2PipelineConfig(max_new_tokens=args.tokens, ignore_eos=True, max_tts_tokens=args.tts_tail,
                               verify_bundle=False, flow=flow, **settings)
    wav, rate = read_wav(args.question)
    audio = prepare_speech(wav, rate, 16000)
    rws = [tuple(int(v) for v in s.split(",")) for s in args.rw.split(";")]
    rows_todo = [(rw, None) for rw in rws] + ([] if args.no_exact else [(rws[0], "exact")])
    result: dict = {
        "schema": SCHEMA, "name": args.name, "argv": argv if argv is not None else sys.argv[1:], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"omnilite": __version__, "python": platform.python_version(), "numpy": np.__version__,
                     "onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__},
        "host": {"cpu": host.cpu_model, "cores": host.physical_cores, "ram_gb": host.ram_gb,
                 "profile": profile.name, "profile_reason": reason, "stage_threads": settings["stage_threads"],
                 "cpu_record": host.cpu_record()},
        "bundle": bundle_info(args.bundle), "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "question": str(args.question), "question_s": len(audio) / 16000, "tokens": args.tokens,
        "tts_tail": args.tts_tail, "runs": args.runs, "flow": asdict(flow), "load": {"start": _load()}, "omnilite": [],
    }
    total = len(rows_todo) * (1 + 2 * args.runs) + (args.runs + 1 if args.checkpoint else 0)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, desc=args.name, unit="turn", disable=args.no_progress) as bar:
        for rw, mode in rows_todo:
            bar.set_postfix_str(f"R/W {rw[0]}/{rw[1]} {mode or 'default'}")
            row, one = omnilite_row(args.bundle, base, audio, rw, mode, args.runs, bar)
            result["omnilite"].append(row)
            if len(result["omnilite"]) == 1:
                png = out / f"omni2-{args.name}.png"
                waterfall_png(one, png, {"bundle": {"family": "llama-omni2"},
                                         "profile": {"name": f"{profile.name}, R/W {rw[0]}/{rw[1]}, overlapped"}})
                result["waterfall"] = png.name
        result["peak_rss_mb_omnilite"] = max(r["peak_rss_mb"] for r in result["omnilite"])
        result["load"]["after_omnilite"] = _load()
        if args.checkpoint:
            plan = plan_baseline(host, torch_bf16_view())  # imports torch: after every omnilite row
            bar.total += (args.runs + 1) * (len(plan.precisions) - 1)
            bar.set_postfix_str("PyTorch " + "+".join(plan.precisions))
            threads = profile.threads_for("llm", host)
            result["host"]["torch_threads"] = threads
            by_precision = torch_baseline(args.checkpoint, audio, rws[0], args.tokens, args.tts_tail, args.runs,
                                          threads, bar, plan.precisions)
            result["torch"] = baseline_result(by_precision, plan, {p: x["ttfa"]["p50"] for p, x in by_precision.items()})
            result["load"]["after_torch"] = _load()
    result["targets"] = targets(result)
    atomic_write_bytes(out / f"omni2-{args.name}.json", (json.dumps(result, indent=2) + "\n").encode())
    write_markdown(result, out / f"omni2-{args.name}.md")
    print((out / f"omni2-{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
