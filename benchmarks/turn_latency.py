"""Perceived latency of a live turn: what moving work before the end of speech buys.

    python -m omnilite.benchmarks.turn_latency BUNDLE [--rounds 3] [--pace 1] [--out benchmarks/results/turn_latency-NAME]

A simulated microphone (`FileAudio`, real time at --pace 1) plays a question into a `Session`; TTFA is
the Session's own: the last speech sample (t0) to the first reply sample the speaker takes, the
600 ms endpointer hangover included. Settings, interleaved in every round on one loaded bundle:

- `baseline`: the reply starts when the endpointer confirms the turn; LLaMA-Omni's first chunk is
  `omega` tokens;
- `speculative`: the reply starts at silence onset and is committed at the confirmation (wasted
  starts counted: speculative replies dropped because the user went on speaking);
- `first-chunk` (LLaMA-Omni): chunks of `first_omega` tokens until the first sample is out;
- `both`.
A second question of about 9 s, three sentences with short pauses (shorter than the hangover: each
one a wasted start), runs the same settings; in a blocked encoder mode it shows what prefilling the
completed blocks while the user speaks buys. LLaMA-Omni2's first-chunk setting is the flow's short
first hop (25 tokens, CosyVoice2's) against the 50-token chunk.

Each setting's reply has a fixed length (random weights never stop); `--long-reply` adds one longer
reply per round in the `both` setting for RTF and underruns (`--start-buffer S`: and one more with an
S-second jitter buffer before the speaker starts, for what smooth playback costs in TTFA). With `--checkpoint` (LLaMA-Omni2) the
PyTorch reference answers the short question in the same run, in its fastest precision on this host
(baseline.py), from the complete audio (no endpointer: its TTFA has no hangover, which favours it).
Peak RSS is omnilite's (reset before the bundle loads, read before torch is imported). Writes
NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.devices.host import describe_cpu, detect_host
from omnilite.devices.profiles import choose_profile, pipeline_settings
from omnilite.devices.tune import tuned_settings
from omnilite.runtime import Pipeline, PipelineConfig
from omnilite.runtime.audio import prepare_speech, read_wav, write_wav
from omnilite.runtime.audio_io import FileAudio, FileLoopConfig
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.events import Done
from omnilite.runtime.omni2.flow import FIRST_HOP_TOKENS
from omnilite.runtime.omni2.pipeline import FIRST_LOOKAHEAD_FRAMES, Omni2PipelineConfig, as_omni2_config
from omnilite.runtime.pipeline import FIRST_OMEGA
from omnilite.runtime.session import Session, SessionConfig

from .cost import describe_speed, host_speed
from .memory import peak_rss_bytes, reset_peak_rss
from .report import write_report
from .streaming import package_versions

DATA = Path(__file__).resolve().parents[1] / "omnilite" / "data"
TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SCHEMA = "omnilite.turn_latency/1"


def long_question(path: Path) -> Path:
    """About 9 s: three spoken sentences joined by 0.3 s pauses (each trimmed of its own silence)."""
    parts = []
    for f in (TEST_DATA / "question_mountain.wav", DATA / "question.wav", TEST_DATA / "question_story_22k.wav"):
        a, r = read_wav(f)
        x = prepare_speech(a, r, 16000)
        loud = np.flatnonzero(np.abs(x) > 0.02)
        parts += [x[loud[0]:loud[-1] + 1], np.zeros(int(0.3 * 16000), np.float32)]
    write_wav(path, np.concatenate([np.zeros(8000, np.float32)] + parts[:-1]), 16000)
    return path


def one_turn(pipe: Pipeline, wav: Path, speculative: bool, pace: float, start_buffer_s: float = 0.0) -> dict:
    with Session(pipe, SessionConfig(vad="silero", speculative_start=speculative, start_buffer_s=start_buffer_s)) as session:
        loop = FileAudio(session, wav, FileLoopConfig(pace=pace, tail_s=1.5))
        loop.start()
        events = []
        while not loop.wait(0.05):
            events += session.poll()
        events += session.poll()
        wasted = session.wasted_starts
        rate = session.output_rate
    done = [e for e in events if isinstance(e, Done)]
    if len(done) != 1:
        raise RuntimeError(f"expected one reply to {wav.name}, got {len(done)}")
    t, stats = done[0].timings, done[0].stats
    audio_s = len(done[0].audio) / done[0].sample_rate
    first_s = stats.get("first_chunk_samples", 0) / rate
    # Wall-clock real-time factor after the first chunk: how long the pipeline took to hand over the
    # rest of the reply per second of it (< 1: it outran the speaker). `rtf` is busy time summed over
    # the speech stages per second of audio, which counts two cores' work twice.
    wall = (t["total"] - t["ttfa_ready"]) / (audio_s - first_s) if audio_s > first_s and "ttfa_ready" in t else None
    return {"ttfa": t["ttfa"], "ttft": t["ttft"], "ttfa_ready": t.get("ttfa_ready"), "wasted_starts": wasted,
            "prefilled_early": stats.get("prefilled_early", 0), "underruns": stats["underruns"],
            "stall_s": stats.get("stalled_samples", 0) / rate, "first_chunk_s": first_s, "wall_rtf": wall,
            "rtf": t.get("rtf"), "audio_s": audio_s, "stages": {k: v for k, v in t.items() if isinstance(v, float)},
            "spans": [list(x) for x in done[0].spans]}


def base_config(bundle: Path, encoder_mode: str | None, max_new_tokens: int, tts_tokens: int) -> PipelineConfig:
    """The detected device profile's providers and threads (the bundle's tuning where it was measured on
    this host), a fixed reply length, and (LLaMA-Omni) no short first chunk: the settings turn it on."""
    b = load_bundle(bundle, verify=False)
    host = detect_host()
    settings = pipeline_settings(choose_profile(None, host)[0], host, b.family)
    write = settings.pop("write", None)
    tuned = tuned_settings(b.manifest, host, str(bundle))
    if tuned and tuned.matches:  # `omnilite tune` measured this host: its threads and mode, as `run` applies them
        settings["stage_threads"] = {**settings["stage_threads"], **tuned.stage_threads}
        settings["mode"] = tuned.mode
    config = PipelineConfig(encoder_mode=encoder_mode, max_new_tokens=max_new_tokens, ignore_eos=True,
                            first_omega=10**6, **settings)
    if b.family == "llama-omni2":
        config = replace(as_omni2_config(config), write=write, max_tts_tokens=tts_tokens)
    return config


def _first_chunk(pipe: Pipeline, short: bool) -> None:
    """Switch the family's first-chunk fast path on or off on a loaded pipeline (read at each reply):
    LLaMA-Omni2's short first flow hop, HiFT's short first lookahead and the LLM held one text chunk
    ahead until the first sample; LLaMA-Omni's short first text chunk."""
    if isinstance(pipe.config, Omni2PipelineConfig):
        pipe.config = replace(pipe.config, flow=replace(pipe.config.flow, first_hop_tokens=FIRST_HOP_TOKENS if short else None),
                              vocoder=replace(pipe.config.vocoder, first_lookahead=FIRST_LOOKAHEAD_FRAMES if short else None),
                              first_audio_priority=short)
    else:
        pipe.first_omega = min(pipe.omega, FIRST_OMEGA) if short else 10**6
        pipe.config = replace(pipe.config, first_audio_priority=short)


def run(bundle: Path, rounds: int, pace: float, encoder_mode: str | None, max_new_tokens: int, tts_tokens: int,
        long_reply: tuple[int, int] | None, checkpoint: Path | None, out: Path, start_buffer_s: float = 0.0) -> dict:
    base = base_config(bundle, encoder_mode, max_new_tokens, tts_tokens)
    host = detect_host()
    settings = {"baseline": (False, False), "speculative": (True, False), "first-chunk": (False, True),
                "both": (True, True)}
    speed = host_speed()
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp, Pipeline.load(bundle, base) as pipe:
        questions = {"short": DATA / "question.wav", "long": long_question(Path(tmp) / "long.wav")}
        one_turn(pipe, questions["short"], True, pace)  # warm-up
        results: dict = {q: {s: [] for s in settings} for q in questions}
        for _ in range(rounds):
            for q, wav in questions.items():
                for name, (speculative, first) in settings.items():
                    _first_chunk(pipe, first)
                    results[q][name].append(one_turn(pipe, wav, speculative, pace))
        mode = str(pipe.encoder.default_mode if encoder_mode is None else encoder_mode)
        family = pipe.bundle.family
        rw = (pipe.config.read, pipe.config.write) if isinstance(pipe.config, Omni2PipelineConfig) else None
    peak_rss = peak_rss_bytes()
    longs: list[dict] = []
    buffered: list[dict] = []
    if long_reply:  # the reply length sizes the pipeline's contexts, so the long replies get a pipeline of their own
        with Pipeline.load(bundle, base_config(bundle, encoder_mode, *long_reply)) as pipe:
            _first_chunk(pipe, True)
            for _ in range(rounds):  # with a start buffer too (interleaved): what smooth playback costs
                longs.append(one_turn(pipe, DATA / "question.wav", True, pace))
                if start_buffer_s:
                    buffered.append(one_turn(pipe, DATA / "question.wav", True, pace, start_buffer_s))
    report = {"schema": SCHEMA, "omnilite": __version__, "bundle": str(bundle), "family": family, "encoder_mode": mode,
              "rounds": rounds, "pace": pace, "max_new_tokens": max_new_tokens, "tts_tokens": tts_tokens,
              "cpu": host.cpu_record(), "host_speed": speed, "threads": base.stage_threads, "pipeline_mode": base.mode,
              "packages": package_versions(),
              "peak_rss_mb": peak_rss / 2**20, "results": results}
    if long_reply:
        report["long_reply"] = {"max_new_tokens": long_reply[0], "tts_tokens": long_reply[1], "runs": longs}
        if start_buffer_s:
            report["long_reply"].update(start_buffer_s=start_buffer_s, buffered_runs=buffered)
    if checkpoint is not None:
        write_report(out.with_name(out.name + "-omnilite-only"), report, markdown(report))  # kept if the baseline dies
        report["torch"] = torch_rows(checkpoint, questions_audio(DATA / "question.wav"), rw, max_new_tokens, tts_tokens,
                                     rounds, host)
    return report


def questions_audio(wav: Path) -> np.ndarray:
    a, r = read_wav(wav)
    return prepare_speech(a, r, 16000)


def _torch_one(checkpoint: Path, audio: np.ndarray, rw: tuple[int, int], tokens: int, tts_tail: int, runs: int,
               threads: int, precision: str) -> dict:
    """One precision of the baseline, in a process of its own (see torch_rows)."""
    from tqdm import tqdm

    from .omni2_bench import torch_baseline

    with tqdm(total=runs + 1, desc=f"torch {precision}", unit="turn") as bar:
        return torch_baseline(checkpoint, audio, rw, tokens, tts_tail, runs, threads, bar, (precision,))[precision]


def torch_rows(checkpoint: Path, audio: np.ndarray, rw: tuple[int, int] | None, tokens: int, tts_tail: int,
               runs: int, host) -> dict:
    """The PyTorch reference to its first audio sample on the short question, in the precisions the
    baseline plan picks for this host (LLaMA-Omni2 checkpoints). Each precision runs in a fresh process,
    one after the other: a real-shape reference in fp32 and bf16 at once, beside this process's
    pipeline memory, outgrew a 24 GiB host (killed for memory), so the precisions are not interleaved."""
    if rw is None:
        raise SystemExit("--checkpoint: the in-run PyTorch baseline is implemented for LLaMA-Omni2 bundles; for "
                         "LLaMA-Omni use `omnilite bench --baseline torch`.")
    import multiprocessing

    from .baseline import baseline_result, plan_baseline, torch_bf16_view

    plan = plan_baseline(host, torch_bf16_view())
    rows = {}
    for p in plan.precisions:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows[p] = pool.apply(_torch_one, (checkpoint, audio, rw, tokens, tts_tail, runs, host.physical_cores, p))
    return baseline_result(rows, plan, {p: r["ttfa"]["p50"] for p, r in rows.items()})


WATERFALL = ("resample", "mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "flow", "hift", "vocoder")


def _p50(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def _opt_p50(runs: list[dict], key: str, digits: int = 3) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return f"{np.median(vals):.{digits}f}" if vals else "-"


def waterfall(run: dict) -> list[str]:
    """Per stage, its calls before the first audio sample was handed over: when the first began and
    the last ended, in seconds from the last speech sample, and their busy time ("vocoder" is flow +
    HiFT, shown apart)."""
    end = run["stages"].get("ttfa_ready", run["ttfa"])
    stages: dict[str, list[float]] = {}
    for name, a, b in run.get("spans", []):
        if a <= end and name != "vocoder" and b - a >= 1e-4:
            row = stages.setdefault(name, [a, b, 0.0, 0])
            row[0], row[1], row[2], row[3] = min(row[0], a), max(row[1], b), row[2] + (b - a), row[3] + 1
    lines = ["| stage | first call starts (s) | last call ends (s) | busy (s) | calls |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {a:.3f} | {b:.3f} | {d:.3f} | {c} |" for n, (a, b, d, c) in sorted(stages.items(), key=lambda kv: kv[1][0])]
    return lines + [f"| first sample handed over | | {end:.3f} | | |", f"| speaker took it (TTFA) | | {run['ttfa']:.3f} | | |"]


def markdown(report: dict) -> str:
    lines = [f"# Turn latency: {Path(report['bundle']).name}", "",
             f"- {report['family']}, encoder mode `{report['encoder_mode']}`; {report['rounds']} interleaved rounds at "
             f"pace {report['pace']} (1 = real time); replies forced to {report['max_new_tokens']} text tokens"
             + (f" (+ at most {report['tts_tokens']} speech tokens after the text)" if report["family"] == "llama-omni2" else "")
             + f"; omnilite {report['omnilite']}",
             f"- CPU: {describe_cpu(report['cpu'])}; threads per stage {report.get('threads')}, {report.get('pipeline_mode')} pipeline",
             f"- Host speed this run: {describe_speed(report.get('host_speed'))}",
             f"- Peak RSS of the omnilite process (bundle loaded, every turn): {report.get('peak_rss_mb', 0):.0f} MiB",
             "- TTFA: last speech sample to the first reply sample taken by the speaker, the 600 ms endpointer "
             "hangover included (Session timing). Ratios are against `baseline` in the same run.", ""]
    for q, by_setting in report["results"].items():
        base = _p50(by_setting["baseline"], "ttfa")
        lines += [f"## {q} question", "", "| setting | TTFA p50 (s) | TTFA max (s) | vs baseline | TTFT p50 (s) | "
                  "first chunk (s) | wall RTF p50 | busy RTF p50 | stall p50 (s) | wasted starts | positions prefilled early |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, runs in by_setting.items():
            lines.append(f"| {name} | {_p50(runs, 'ttfa'):.3f} | {max(r['ttfa'] for r in runs):.3f} | "
                         f"{base / _p50(runs, 'ttfa'):.2f}x | {_p50(runs, 'ttft'):.3f} | {_opt_p50(runs, 'first_chunk_s')} | "
                         f"{_opt_p50(runs, 'wall_rtf', 2)} | {_opt_p50(runs, 'rtf', 2)} | {_opt_p50(runs, 'stall_s')} | "
                         f"{sum(r['wasted_starts'] for r in runs)} | {runs[0]['prefilled_early']} |")
        lines.append("")
    short = report["results"]["short"]
    if "stages" in short["baseline"][0]:
        lines += ["## Per-stage busy time, short question (p50, s)", "",
                  "Stage totals of the whole reply as the pipeline times them; `ttfa_ready` is when the pipeline "
                  "handed the first audio over.", "", "| stage | " + " | ".join(short) + " |",
                  "|---|" + "---:|" * len(short)]
        for stage in WATERFALL + ("ttft", "ttfa_ready", "ttfa"):
            vals = [np.median([r["stages"].get(stage, 0.0) for r in runs]) for runs in short.values()]
            if any(vals):
                lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        lines.append("")
    both = short.get("both") or []
    if both and both[0].get("spans"):
        lines += ["## Waterfall to the first sample (`both`, short question, median-TTFA round)", "",
                  "Stage calls before the first sample was handed over, in seconds from the last speech sample (t0).", ""]
        lines += waterfall(sorted(both, key=lambda r: r["ttfa"])[len(both) // 2]) + [""]
    if "long_reply" in report:
        runs = report["long_reply"]["runs"]
        lines += ["## Long reply (`both`, short question)", "",
                  f"{len(runs)} replies of {np.median([r['audio_s'] for r in runs]):.1f} s of audio (p50): wall RTF p50 "
                  f"{_opt_p50(runs, 'wall_rtf', 2)} (hand-over time after the first chunk per second of the rest), busy RTF p50 "
                  f"{_p50(runs, 'rtf'):.2f} (speech stages' busy time summed, per second of audio), underruns "
                  f"{sum(r['underruns'] for r in runs)} blocks, stall p50 {_opt_p50(runs, 'stall_s')} s, TTFA p50 "
                  f"{_p50(runs, 'ttfa'):.3f} s.", ""]
        if report["long_reply"].get("buffered_runs"):
            b = report["long_reply"]["buffered_runs"]
            lines += [f"With a {report['long_reply']['start_buffer_s']:.2f} s start buffer (`SessionConfig.start_buffer_s`, same "
                      f"rounds, interleaved): TTFA p50 {_p50(b, 'ttfa'):.3f} s, underruns {sum(r['underruns'] for r in b)} "
                      f"blocks, stall p50 {_opt_p50(b, 'stall_s')} s, wall RTF p50 {_opt_p50(b, 'wall_rtf', 2)}.", ""]
    if "torch" in report:
        t = report["torch"]
        ours = _p50(short["both"], "ttfa")
        lines += ["## PyTorch baseline, same run, short question", "",
                  f"{t['why']} {t['plan']['reason']}", "",
                  "| precision | TTFA p50 (s) | TTFT p50 (s) | encoder | llm_prefill | llm_decode | speech_generator | flow | hift |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p, r in t["by_precision"].items():
            lines.append(f"| {p} | {r['ttfa']['p50']:.3f} | {r['ttft']['p50']:.3f} | " + " | ".join(
                f"{r[k]['p50']:.3f}" for k in ("encoder", "llm_prefill", "llm_decode", "speech_generator", "flow", "hift")) + " |")
        lines += ["", f"omnilite `both` TTFA p50 {ours:.3f} s (hangover included) vs PyTorch {t['precision']} "
                      f"{t['ttfa']['p50']:.3f} s (from the complete audio, no hangover): **{t['ttfa']['p50'] / ours:.2f}x**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.turn_latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pace", type=float, default=1.0)
    ap.add_argument("--encoder-mode", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--tts-tokens", type=int, default=60, help="LLaMA-Omni2: speech tokens after the text ends (at most)")
    ap.add_argument("--long-reply", default=None, metavar="TEXT,SPEECH",
                    help="one more reply per round with TEXT tokens (+ SPEECH after the text, LLaMA-Omni2) for RTF")
    ap.add_argument("--start-buffer", type=float, default=0.0, metavar="S",
                    help="with --long-reply: also time each long reply with an S-second start buffer (interleaved)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="LLaMA-Omni2: the checkpoint, for the PyTorch baseline")
    ap.add_argument("--out", type=Path, default=None, help="result stem (default benchmarks/results/turn_latency-BUNDLE)")
    args = ap.parse_args(argv)
    long_reply = tuple(int(v) for v in args.long_reply.split(",")) if args.long_reply else None
    out = args.out or Path(__file__).parent / "results" / f"turn_latency-{args.bundle.name}"
    report = run(args.bundle, args.rounds, args.pace, args.encoder_mode, args.max_new_tokens, args.tts_tokens,
                 long_reply, args.checkpoint, out, args.start_buffer)
    write_report(out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
