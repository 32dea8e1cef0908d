"""LLaMA-Omni2 speech side cost: what one second of reply audio costs in the TTS LM, the flow and HiFT,
and what the first-chunk fast path and the thread budget per phase do to TTFA and to the real-time
factor after the first sample. Everything in one process and one run, variants interleaved round by
round (the host is shared: only ratios within a run mean anything), the CPU features recorded.

Parts:
* memory bandwidth (numpy copy of 256 MiB, 1 and 2 threads): the TTS LM decode's bound is the bytes
  of its weights read once per token over this bandwidth;
* TTS LM decode ms/token at 1 and 2 threads (llama.cpp, greedy, after a 16-token prefix);
* flow: estimator ms per call (CFG batch of 2) at one and three chunks of frames, encoder ms per
  call, HiFT (f0 + decode) ms per mel frame, each at 1 and 2 ORT intra-op threads;
* flow schedules over the same random speech tokens (10 s): busy seconds per second of audio and
  mel drift against the exact path (whole-utterance synthesis: SNR and max abs), for the default and
  for options that change outputs (fewer Euler steps, a smaller window, a longer hop);
* first flow hop sweep: SNR of streamed vs whole-utterance audio and speech tokens before the first
  flow step;
* end to end (overlapped, one pipeline, the streaming config switched between turns): TTFA with the
  default first hop vs the exact 53-token schedule, the phase budget on vs off, and after the first
  sample the RTF (wall time from first to last chunk over the audio after the first chunk) and the
  underrun (how long a player that starts at the first sample would stall), plus per-stage busy
  seconds per second of audio.

    python -m omnilite.benchmarks.omni2_speech_cost /work/o2/small --name real-0.5B
writes benchmarks/results/omni2-speech-cost-<name>.json and .md (text after ``<!-- notes -->`` in an
existing .md is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .omni2_bench import _load, _p, _stats, bundle_info
from .report import write_markdown_keeping_notes

log = logging.getLogger(__name__)

SCHEMA = "omnilite.bench.omni2_speech_cost/1"
RESULTS = Path(__file__).parent / "results"
TOKEN_RATE = 25  # CosyVoice2 speech tokens per second of audio


def _best(fn, repeats: int) -> float:
    """Fastest of `repeats` timings (the least disturbed by the other load on a shared host)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# --- memory bandwidth ---------------------------------------------------------------------------

def bandwidth_gbs(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second), numpy copies in `threads` threads (numpy
    releases the GIL while copying), each on its own slice of a buffer far larger than the caches."""
    src = np.ones(mib * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def run() -> None:
        ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    run()
    return 2 * src.nbytes / _best(run, repeats) / 1e9


# --- unit costs ----------------------------------------------------------------------------------

def tts_decode_cost(bundle, threads: list[int], tokens: int, rounds: int) -> dict:
    """ms per greedy decode step of the TTS LM (one position, logits over its whole vocabulary)."""
    from omnilite.runtime.llm import LlamaCppLLM, stage_llm_config

    lm = LlamaCppLLM(bundle.file("tts_lm"), stage_llm_config(bundle, "tts_lm", n_ctx=512))
    prefix = [int(bundle["tts"]["sep_id"])] * 16
    times: dict[int, list[float]] = {n: [] for n in threads}
    try:
        for _ in range(rounds):
            for n in threads:
                lm.set_threads(n, n)
                lm.reset()
                logits = lm.eval_tokens(prefix, want_last=True)[0]
                t = time.perf_counter()
                for _ in range(tokens):
                    logits = lm.eval_tokens([int(np.argmax(logits))], want_last=True)[0]
                times[n].append((time.perf_counter() - t) / tokens)
        shape = lm.shape()
    finally:
        lm.close()
    return {"shape": shape, "ms_per_token": {str(n): 1e3 * min(v) for n, v in times.items()},
            "ms_per_token_p50": {str(n): 1e3 * _p(v, 50) for n, v in times.items()}}


def onnx_costs(bundle, threads: list[int], rounds: int) -> dict:
    """Flow encoder / estimator calls and HiFT per mel frame, per ORT intra-op thread count."""
    from omnilite.runtime.omni2.flow import FlowDecoder
    from omnilite.runtime.omni2.hift import HiFTVocoder
    from omnilite.runtime.onnx_session import SessionOptions

    parts = {n: (FlowDecoder(bundle, SessionOptions(intra_op_threads=n)), HiFTVocoder(bundle, SessionOptions(intra_op_threads=n)))
             for n in threads}
    flow = parts[threads[0]][0]
    chunk = flow.chunk_tokens
    rng = np.random.default_rng(0)
    out: dict = {"chunk_tokens": chunk, "ratio": flow.ratio, "n_timesteps": flow.n_timesteps}
    cases = {}
    for n, (f, h) in parts.items():
        for frames in (chunk * f.ratio, 3 * chunk * f.ratio):
            feeds = {"x": rng.standard_normal((2, 80, frames)).astype(np.float32), "mask": np.ones((2, 1, frames), np.float32),
                     "mu": rng.standard_normal((2, 80, frames)).astype(np.float32), "t": np.full(2, 0.5, np.float32),
                     "spks": np.zeros((2, 80), np.float32), "cond": np.zeros((2, 80, frames), np.float32),
                     "chunk_frames": np.asarray(chunk * f.ratio, np.int64)}
            cases[f"estimator_{frames}f_t{n}"] = (lambda f=f, feeds=feeds: f.estimator.run(None, feeds), frames)
        toks = rng.integers(0, 6561, 3 * chunk + 3).tolist()
        cases[f"encoder_{len(toks)}tok_t{n}"] = (lambda f=f, toks=toks: f.mu(toks), len(toks))
        mel = rng.standard_normal((80, 2 * chunk)).astype(np.float32)
        cases[f"hift_{mel.shape[1]}f_t{n}"] = (lambda h=h, mel=mel: h.offline(mel), mel.shape[1])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn, _ in cases.values():
        fn()  # warm-up
    for _ in range(rounds):  # interleaved: every case once per round
        for k, (fn, _) in cases.items():
            times[k].append(_best(fn, 1))
    out["calls_ms"] = {k: 1e3 * min(v) for k, v in times.items()}
    out["per_unit_ms"] = {k: 1e3 * min(v) / cases[k][1] for k, v in times.items()}  # per frame / per token
    del parts
    gc.collect()
    return out


# --- flow schedules: cost per second of audio and drift ------------------------------------------------

def flow_schedules(bundle, variants: dict, units: list[int], threads: int, rounds: int) -> dict:
    from omnilite.runtime.metrics import snr_db
    from omnilite.runtime.omni2.flow import FlowDecoder
    from omnilite.runtime.omni2.hift import HiFTVocoder
    from omnilite.runtime.onnx_session import SessionOptions

    flow = FlowDecoder(bundle, SessionOptions(intra_op_threads=threads))
    hift = HiFTVocoder(bundle, SessionOptions(intra_op_threads=threads))
    t = time.perf_counter()
    exact = flow.offline(units)
    exact_s = time.perf_counter() - t
    audio_s = len(units) / TOKEN_RATE
    res: dict = {"units": len(units), "audio_s": audio_s, "threads": threads,
                 "whole_utterance": {"flow_s": exact_s, "flow_s_per_audio_s": exact_s / audio_s}, "variants": {}}
    times: dict[str, list[float]] = {k: [] for k in variants}
    mels: dict[str, np.ndarray] = {}
    steps: dict[str, int] = {}
    for _ in range(rounds):
        for name, cfg in variants.items():
            fs = flow.stream(cfg)
            t = time.perf_counter()
            parts = [fs.push(units[a:a + 10]) for a in range(0, len(units), 10)] + [fs.flush()]
            times[name].append(time.perf_counter() - t)
            mels[name], steps[name] = np.concatenate(parts, axis=1), fs.steps
    hop_s = _best(lambda: hift.offline(exact), 1)  # HiFT cost per second, offline (the ring adds its context)
    res["hift_offline_s_per_audio_s"] = hop_s / audio_s
    for name, cfg in variants.items():
        m = mels[name]
        res["variants"][name] = {
            "config": dataclasses.asdict(cfg), "steps": steps[name],
            "flow_s_per_audio_s": min(times[name]) / audio_s,
            "mel_snr_db": snr_db(exact.ravel(), m.ravel()), "mel_max_abs": float(np.abs(m - exact).max()),
            "mel_max_abs_rel": float(np.abs(m - exact).max() / np.abs(exact).max())}
    return res


def first_hop_sweep(bundle, hops: list[int], units: list[int]) -> dict:
    """Per first hop: when the first flow step and the first audio come, and the drift against
    whole-utterance synthesis as mel SNR (on the first hop's frames, the only ones that drift, and on
    the reply) and as audio SNR. The audio SNR also counts the harmonic phase HiFT's source carries
    from the first frames on (an f0 that differed early shifts every later sine), so it stays low
    after the drifting frames end: the mel is the measure of the flow's drift."""
    from omnilite.runtime.metrics import snr_db
    from omnilite.runtime.omni2.flow import FlowDecoder, FlowStreamConfig
    from omnilite.runtime.omni2.hift import HiFTVocoder

    flow, hift = FlowDecoder(bundle), HiFTVocoder(bundle)
    whole_mel = flow.offline(units)
    whole = hift.offline(whole_mel)
    out = {}
    for hop in hops:
        fs, hs = flow.stream(FlowStreamConfig(first_hop_tokens=hop)), hift.stream()
        mels, parts, first_step = [], [], None
        for i in range(len(units)):
            mels.append(fs.push(units[i:i + 1]))
            parts.append(hs.push(mels[-1]))
            first_step = first_step or (i + 1 if fs.steps else None)
        mels.append(fs.flush())
        parts += [hs.push(mels[-1]), hs.flush()]
        mel, audio = np.concatenate(mels, axis=1), np.concatenate(parts)
        head = hop * flow.ratio
        out[str(hop)] = {"tokens_before_first_flow_step": first_step,
                         "tokens_before_first_audio": next(i + 1 for i, p in enumerate(parts) if len(p)),
                         "first_hop_mel_snr_db": snr_db(whole_mel[:, :head].ravel(), mel[:, :head].ravel()),
                         "mel_snr_db": snr_db(whole_mel.ravel(), mel.ravel()), "audio_snr_db": snr_db(whole, audio),
                         "drift_frames": fs.drift_frames}
    return out


def flow_precisions(bundles: dict[str, Path], threads: int, rounds: int, units: list[int]) -> dict:
    """The flow stage of bundles that differ in its precision (e.g. the preset's INT8 vs the fp32
    export): estimator ms per call at one and three chunks (interleaved rounds), and whether the
    exact streaming schedule (hop = chunk, no window) still equals whole-utterance synthesis: dynamic
    INT8 quantizes activations with a scale taken from the whole input, so a window's frames are
    quantized differently from the same frames in a longer input."""
    from omnilite.runtime.bundle import load_bundle
    from omnilite.runtime.metrics import snr_db
    from omnilite.runtime.omni2.flow import FlowDecoder, FlowStreamConfig
    from omnilite.runtime.onnx_session import SessionOptions

    flows = {k: FlowDecoder(load_bundle(v, verify=False), SessionOptions(intra_op_threads=threads)) for k, v in bundles.items()}
    rng = np.random.default_rng(0)
    chunk_frames = next(iter(flows.values())).chunk_frames
    cases = {}
    for name, f in flows.items():
        for frames in (chunk_frames, 3 * chunk_frames):
            feeds = {"x": rng.standard_normal((2, 80, frames)).astype(np.float32), "mask": np.ones((2, 1, frames), np.float32),
                     "mu": rng.standard_normal((2, 80, frames)).astype(np.float32), "t": np.full(2, 0.5, np.float32),
                     "spks": np.zeros((2, 80), np.float32), "cond": np.zeros((2, 80, frames), np.float32),
                     "chunk_frames": np.asarray(chunk_frames, np.int64)}
            cases[f"{name} estimator {frames}f"] = lambda f=f, feeds=feeds: f.estimator.run(None, feeds)
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(_best(fn, 1))
    out: dict = {"threads": threads, "bundles": {k: str(v) for k, v in bundles.items()},
                 "estimator_ms": {k: 1e3 * min(v) for k, v in times.items()}, "exact_schedule_mel_snr_db": {}}
    for name, f in flows.items():
        fs = f.stream(FlowStreamConfig(window_tokens=None))
        mel = np.concatenate([fs.push(units), fs.flush()], axis=1)
        out["exact_schedule_mel_snr_db"][name] = snr_db(f.offline(units).ravel(), mel.ravel())
    return out


# --- end to end ---------------------------------------------------------------------------------

def _turn(pipe, audio: np.ndarray) -> dict:
    from omnilite.runtime import AudioChunk, Done

    arrivals, done = [], None
    t0 = time.perf_counter()
    for e in pipe.respond(audio, 16000, t0=t0):
        if isinstance(e, AudioChunk):
            arrivals.append((time.perf_counter() - t0, len(e.samples)))
        elif isinstance(e, Done):
            done = e
    sr = done.sample_rate
    first_t, first_n = arrivals[0]
    played, stall = 0, 0.0
    for t, n in arrivals:  # a player starting at the first sample: when does each chunk's start play?
        stall = max(stall, t - (first_t + played / sr))
        played += n
    after_s = (played - first_n) / sr
    busy = {k: done.timings.get(k, 0.0) for k in ("speech_generator", "flow", "hift", "llm_decode")}
    # TTFA - TTFT: the speech side's part of the wait (the first-chunk path after the first text token),
    # apart from the encoder and prefill before it, which dominate the noise on a shared host.
    return {"ttfa": done.timings["ttfa"], "ttft": done.timings["ttft"], "audio_s": played / sr,
            "ttfa_after_ttft": done.timings["ttfa"] - done.timings["ttft"],
            "rtf_after_first": (arrivals[-1][0] - first_t) / after_s if after_s > 0 else float("nan"),
            "underrun_s": stall, "busy_per_audio_s": {k: v / (played / sr) for k, v in busy.items()},
            "units": len(done.units)}


def end_to_end(bundle_path: Path, base, variants: dict, audio: np.ndarray, rounds: int) -> dict:
    """One pipeline per thread setting of its ONNX stages (sessions fix their threads); within a
    pipeline the streaming config is switched between turns. Every variant once per round."""
    from omnilite.runtime import Pipeline

    pipes: dict = {}
    try:
        for name, (vocoder_threads, _) in variants.items():
            if vocoder_threads not in pipes:
                cfg = dataclasses.replace(base, stage_threads={**base.stage_threads, "vocoder": vocoder_threads})
                pipes[vocoder_threads] = Pipeline.load(bundle_path, cfg)
        for pipe in pipes.values():
            _turn(pipe, audio)  # warm-up
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for r in range(rounds):
            for name, (vt, changes) in variants.items():
                pipe = pipes[vt]
                pipe.config = dataclasses.replace(pipe.config, **changes)
                row = _turn(pipe, audio)
                log.info("round %d %s: TTFA %.2f s, RTF after first %.2f, underrun %.2f s", r, name, row["ttfa"],
                         row["rtf_after_first"], row["underrun_s"])
                runs[name].append(row)
    finally:
        for p in pipes.values():
            p.close()
        pipes.clear()
        gc.collect()
    out = {}
    for name, rows in runs.items():
        out[name] = {k: _stats([x[k] for x in rows]) for k in ("ttfa", "ttft", "ttfa_after_ttft", "rtf_after_first", "underrun_s", "audio_s")}
        out[name]["turns"] = [{k: v for k, v in x.items() if k != "busy_per_audio_s"} for x in rows]
        out[name]["busy_per_audio_s"] = {k: _p([x["busy_per_audio_s"][k] for x in rows], 50) for k in rows[0]["busy_per_audio_s"]}
        out[name]["units"] = rows[0]["units"]
    return out


# --- report -------------------------------------------------------------------------------------

def write_markdown(res: dict, path: Path) -> None:
    from omnilite.devices.host import describe_cpu

    b = res["bundle"]
    L = [f"# LLaMA-Omni2 speech side cost: {res['name']}", "",
         "Random weights in the released layout: the speech is babble, the costs are real. One process, "
         "variants interleaved round by round; only ratios within this run mean anything.", "",
         f"- CPU: {describe_cpu(res['host']['cpu'])}; profile {res['host']['profile']} (threads {res['host']['stage_threads']})",
         f"- bundle {b['path']} ({b['quantization'] or 'fp32'}, {b['mb']:.0f} MiB): "
         + ", ".join(f"{k} {v['precision']}" for k, v in b["stages"].items() if k in ("tts_lm", "flow_estimator", "flow_encoder", "hift")),
         f"- versions: {res['versions']}",
         f"- load average: {res['load']['start']['load1']:.2f} at start, {res['load']['end']['load1']:.2f} at the end", ""]
    bw, tts = res["bandwidth_gbs"], res["tts_decode"]
    size = tts["shape"]["size_bytes"]
    L += ["## TTS LM decode vs its bandwidth bound", "",
          "| threads | copy bandwidth (GB/s) | weights (MiB) | bound (ms/token) | measured ms/token (best / p50) | per second of audio (s) |",
          "|---:|---:|---:|---:|---:|---:|"]
    for n, ms in tts["ms_per_token"].items():
        bound = size / (bw[n] / 2 * 1e9) * 1e3  # weights are read, not copied: half the copy traffic
        L.append(f"| {n} | {bw[n]:.1f} | {size / 2**20:.0f} | {bound:.1f} | {ms:.1f} / {tts['ms_per_token_p50'][n]:.1f} | {ms * TOKEN_RATE / 1e3:.2f} |")
    L += ["", f"The bound reads every weight byte once per token at the copy test's read rate (half its bytes moved); "
          f"the output layer spans the TTS LM's whole vocabulary ({tts['shape']['n_vocab']} ids).", ""]
    oc = res["onnx"]
    L += ["## ONNX stages per call (best of the rounds)", "", "| call | ms | ms per frame (token) |", "|---|---:|---:|"]
    for k, ms in oc["calls_ms"].items():
        L.append(f"| {k} | {ms:.1f} | {oc['per_unit_ms'][k]:.2f} |")
    fsch = res["flow_schedules"]
    L += ["", f"## Flow schedules over {fsch['units']} speech tokens ({fsch['audio_s']:.1f} s), {fsch['threads']} thread(s)", "",
          f"Whole-utterance synthesis (the exact path): {fsch['whole_utterance']['flow_s_per_audio_s']:.2f} s per second of audio; "
          f"HiFT offline {fsch['hift_offline_s_per_audio_s']:.2f} s per second.", "",
          "| variant | steps | flow s per audio s | mel SNR vs exact (dB) | mel max abs (rel) |", "|---|---:|---:|---:|---:|"]
    for k, v in fsch["variants"].items():
        L.append(f"| {k} | {v['steps']} | {v['flow_s_per_audio_s']:.2f} | {v['mel_snr_db']:.1f} | {v['mel_max_abs']:.3f} ({v['mel_max_abs_rel']:.3f}) |")
    if "flow_precisions" in res:
        fp = res["flow_precisions"]
        L += ["", f"## Flow precision ({fp['threads']} thread(s))", "",
              "| estimator call | ms |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in fp["estimator_ms"].items()]
        L += ["", "Exact streaming schedule (hop = chunk, no window) vs whole-utterance synthesis, mel SNR: "
              + "; ".join(f"{k} {v:.1f} dB" for k, v in fp["exact_schedule_mel_snr_db"].items()) + "."]
    L += ["", "## First flow hop: drift against whole-utterance synthesis", "",
          "Tokens arriving one at a time. Mel SNR on the first hop's frames (the only ones that drift) and on the "
          "reply; the audio SNR also counts HiFT's harmonic phase, which an early f0 difference shifts for the rest "
          "of the reply.", "",
          "| first hop (tokens) | tokens before the first flow step | tokens before first audio | mel SNR, first hop's frames (dB) | mel SNR, reply (dB) | audio SNR (dB) |",
          "|---:|---:|---:|---:|---:|---:|"]
    for k, v in res["first_hop_sweep"].items():
        L.append(f"| {k} | {v['tokens_before_first_flow_step']} | {v['tokens_before_first_audio']} | "
                 f"{v['first_hop_mel_snr_db']:.1f} | {v['mel_snr_db']:.1f} | {v['audio_snr_db']:.1f} |")
    e2e = res["end_to_end"]
    L += ["", f"## End to end ({res['e2e_rounds']} rounds, overlapped, {res['tokens']} text tokens + up to {res['tts_tail']} speech tokens after the text)", "",
          "| variant | TTFA p50 (s) | TTFT p50 | TTFA - TTFT p50 | RTF after first sample p50 | underrun p50 (s) | audio (s) | TTS / flow / HiFT busy per audio s |",
          "|---|---:|---:|---:|---:|---:|---:|---|"]
    for k, v in e2e.items():
        bsy = v["busy_per_audio_s"]
        gap = f"{v['ttfa_after_ttft']['p50']:.2f}" if "ttfa_after_ttft" in v else "-"
        L.append(f"| {k} | {v['ttfa']['p50']:.2f} | {v['ttft']['p50']:.2f} | {gap} | {v['rtf_after_first']['p50']:.2f} | "
                 f"{v['underrun_s']['p50']:.2f} | {v['audio_s']['p50']:.1f} | {bsy['speech_generator']:.2f} / {bsy['flow']:.2f} / {bsy['hift']:.2f} |")
    L += ["", "Variants: " + "; ".join(f"**{k}**: {d}" for k, d in res["e2e_variants"].items()), ""]
    write_markdown_keeping_notes(path, "\n".join(L) + "\n")


def _write_json(res: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--name", default="real-0.5B")
    ap.add_argument("--question", type=Path, default=Path(__file__).parent / "data" / "speech" / "s08.wav")
    ap.add_argument("--tokens", type=int, default=24, help="text tokens per reply")
    ap.add_argument("--tts-tail", type=int, default=176, help="speech tokens after the text ends (24 + 176: about 10 s)")
    ap.add_argument("--rounds", type=int, default=2, help="end-to-end rounds (after one warm-up turn per pipeline)")
    ap.add_argument("--unit-rounds", type=int, default=3, help="rounds of the unit-cost measurements")
    ap.add_argument("--schedule-units", type=int, default=250, help="speech tokens for the flow schedules (250: 10 s)")
    ap.add_argument("--schedule-rounds", type=int, default=1, help="rounds of the flow schedules (their drift is deterministic)")
    ap.add_argument("--e2e-variants", type=int, default=None,
                    help="run only the first N end-to-end variants (e.g. 3: first hop and phase budget, for more rounds in less time)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: units, schedules, sweep, e2e")
    ap.add_argument("--compare-flow", type=Path, default=None,
                    help="another bundle of the same checkpoint (e.g. the fp32 export): compare its flow's speed and streaming exactness")
    ap.add_argument("--merge", action="store_true", help="add the parts run now to the existing result of this name")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--from-json", type=Path, help="only re-render the markdown of this result file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        write_markdown(json.loads(args.from_json.read_text()), args.from_json.with_suffix(".md"))
        return 0
    if args.bundle is None:
        ap.error("a bundle is needed (or --from-json)")
    skip = set(filter(None, args.skip.split(",")))

    import llama_cpp
    import onnxruntime

    from omnilite import __version__
    from omnilite.devices.host import detect_host
    from omnilite.devices.profiles import choose_profile, pipeline_settings
    from omnilite.runtime.audio import prepare_speech, read_wav
    from omnilite.runtime.bundle import load_bundle
    from omnilite.runtime.omni2.flow import FIRST_HOP_TOKENS, FlowStreamConfig
    from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig

    host = detect_host()
    profile, reason = choose_profile(None, host)
    settings = pipeline_settings(profile, host, "llama-omni2")
    rw = (settings.pop("omega"), settings.pop("write"))
    bundle = load_bundle(args.bundle, verify=False)
    res: dict = {"schema": SCHEMA, "name": args.name, "argv": argv if argv is not None else sys.argv[1:],
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "versions": {"omnilite": __version__, "python": platform.python_version(), "numpy": np.__version__,
                              "onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__},
                 "host": {"cpu": host.cpu_record(), "profile": profile.name, "profile_reason": reason,
                          "stage_threads": settings["stage_threads"], "read_write": rw},
                 "bundle": bundle_info(args.bundle), "tokens": args.tokens, "tts_tail": args.tts_tail,
                 "e2e_rounds": args.rounds, "load": {"start": _load()}}
    out_json = args.out_dir / f"omni2-speech-cost-{args.name}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.merge and out_json.exists():
        res = {**json.loads(out_json.read_text()), "merged": {"argv": res["argv"], "created": res["created"], "load": res["load"]}}
    threads = sorted({1, max(1, host.physical_cores)})
    units = np.random.default_rng(0).integers(0, 6561, args.schedule_units).tolist()

    if "units" not in skip:
        res["bandwidth_gbs"] = {str(n): bandwidth_gbs(n) for n in threads}
        res["tts_decode"] = tts_decode_cost(bundle, threads, tokens=32, rounds=args.unit_rounds)
        res["onnx"] = onnx_costs(bundle, threads, args.unit_rounds)
        log.info("unit costs: %s", {k: res[k] for k in ("bandwidth_gbs",)})
    if "schedules" not in skip:
        chunk = int(bundle["flow"]["chunk_tokens"])
        variants = {
            "default (hop = chunk, 100-token window)": FlowStreamConfig(),
            "5 Euler steps": FlowStreamConfig(n_timesteps=5),
            "window = 1 chunk (left_chunks 0)": FlowStreamConfig(left_chunks=0),
            "hop 2 chunks": FlowStreamConfig(hop_tokens=2 * chunk),
            "hop 2 chunks + 5 Euler steps": FlowStreamConfig(hop_tokens=2 * chunk, n_timesteps=5),
        }
        vt = settings["stage_threads"].get("vocoder", 1)
        res["flow_schedules"] = flow_schedules(bundle, variants, units, vt, rounds=args.schedule_rounds)
    if args.compare_flow is not None:
        vt = settings["stage_threads"].get("vocoder", 1)
        res["flow_precisions"] = flow_precisions({f"{res['bundle']['stages']['flow_estimator']['precision']} ({args.bundle.name})": args.bundle,
                                                  f"compare ({args.compare_flow.name})": args.compare_flow},
                                                 vt, args.unit_rounds, units[:120])
    if "sweep" not in skip:
        res["first_hop_sweep"] = first_hop_sweep(bundle, [5, 10, 15, FIRST_HOP_TOKENS, 50], units[:150])
    _write_json(res, out_json)
    if "e2e" not in skip:
        wav, rate = read_wav(args.question)
        audio = prepare_speech(wav, rate, 16000)
        base = Omni2PipelineConfig(max_new_tokens=args.tokens, ignore_eos=True, max_tts_tokens=args.tts_tail,
                                   verify_bundle=False, read=rw[0], write=rw[1], **settings)
        vt = settings["stage_threads"].get("vocoder", 1)
        fast = Omni2PipelineConfig().flow
        variants = {
            "first hop 25, phase budget on (default)": (vt, {"flow": fast, "phase_threads": True}),
            "first hop = chunk (53 tokens), phase on": (vt, {"flow": FlowStreamConfig(), "phase_threads": True}),
            "first hop 25, phase budget off": (vt, {"flow": fast, "phase_threads": False}),
        }
        if max(threads) > vt:
            variants[f"first hop 25, phase on, flow/HiFT {max(threads)} threads"] = (max(threads), {"flow": fast, "phase_threads": True})
        # Output-changing options together (drift in the schedules table): what they buy after the first sample.
        chunk = int(bundle["flow"]["chunk_tokens"])
        cut = dataclasses.replace(fast, hop_tokens=2 * chunk, n_timesteps=5)
        variants[f"options: hop 2 chunks + 5 Euler steps, flow/HiFT {max(threads)} threads"] = (max(threads), {"flow": cut, "phase_threads": True})
        variants = dict(list(variants.items())[:args.e2e_variants])
        res["e2e_variants"] = {k: f"vocoder threads {v[0]}, " + ", ".join(f"{a}={b}" for a, b in v[1].items()) for k, v in variants.items()}
        res["end_to_end"] = end_to_end(args.bundle, base, variants, audio, args.rounds)
    res["load"]["end" if not args.merge else "end_merged"] = _load()
    _write_json(res, out_json)
    if all(k in res for k in ("tts_decode", "flow_schedules", "first_hop_sweep", "end_to_end")):
        write_markdown(res, out_json.with_suffix(".md"))
        print(out_json.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
