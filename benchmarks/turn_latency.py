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
completed blocks while the user speaks buys. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.devices.host import describe_cpu, detect_host
from omnilite.runtime import Pipeline, PipelineConfig
from omnilite.runtime.pipeline import FIRST_OMEGA
from omnilite.runtime.audio import prepare_speech, read_wav, write_wav
from omnilite.runtime.audio_io import FileAudio, FileLoopConfig
from omnilite.runtime.events import Done
from omnilite.runtime.session import Session, SessionConfig

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


def one_turn(pipe: Pipeline, wav: Path, speculative: bool, pace: float) -> dict:
    with Session(pipe, SessionConfig(vad="silero", speculative_start=speculative)) as session:
        loop = FileAudio(session, wav, FileLoopConfig(pace=pace, tail_s=1.5))
        loop.start()
        events = []
        while not loop.wait(0.05):
            events += session.poll()
        events += session.poll()
        wasted = session.wasted_starts
    done = [e for e in events if isinstance(e, Done)]
    if len(done) != 1:
        raise RuntimeError(f"expected one reply to {wav.name}, got {len(done)}")
    t = done[0].timings
    return {"ttfa": t["ttfa"], "ttft": t["ttft"], "ttfa_ready": t.get("ttfa_ready"), "wasted_starts": wasted,
            "prefilled_early": done[0].stats.get("prefilled_early", 0), "underruns": done[0].stats["underruns"]}


def run(bundle: Path, rounds: int, pace: float, encoder_mode: str | None, max_new_tokens: int) -> dict:
    base = PipelineConfig(encoder_mode=encoder_mode, max_new_tokens=max_new_tokens, ignore_eos=True, first_omega=10**6)
    host = detect_host()
    with tempfile.TemporaryDirectory() as tmp, Pipeline.load(bundle, base) as pipe:
        questions = {"short": DATA / "question.wav", "long": long_question(Path(tmp) / "long.wav")}
        steady_first = pipe.first_omega  # with first_omega huge: omega (LLaMA-Omni) or None
        settings = {"baseline": (False, steady_first), "speculative": (True, steady_first)}
        if steady_first is not None:  # LLaMA-Omni: a short first chunk is a setting of its own
            quick = min(pipe.omega, FIRST_OMEGA)
            settings.update({"first-chunk": (False, quick), "both": (True, quick)})
        one_turn(pipe, questions["short"], True, pace)  # warm-up
        results: dict = {q: {s: [] for s in settings} for q in questions}
        for _ in range(rounds):
            for q, wav in questions.items():
                for name, (speculative, first) in settings.items():
                    pipe.first_omega = first
                    results[q][name].append(one_turn(pipe, wav, speculative, pace))
        mode = str(pipe.encoder.default_mode if encoder_mode is None else encoder_mode)
        family = pipe.bundle.family
    return {"schema": SCHEMA, "omnilite": __version__, "bundle": str(bundle), "family": family, "encoder_mode": mode,
            "rounds": rounds, "pace": pace, "max_new_tokens": max_new_tokens, "cpu": host.cpu_record(),
            "packages": package_versions(), "results": results}


def markdown(report: dict) -> str:
    lines = [f"# Turn latency: {Path(report['bundle']).name}", "",
             f"- {report['family']}, encoder mode `{report['encoder_mode']}`; {report['rounds']} interleaved rounds at "
             f"pace {report['pace']} (1 = real time); omnilite {report['omnilite']}",
             f"- CPU: {describe_cpu(report['cpu'])}",
             "- TTFA: last speech sample to the first reply sample taken by the speaker, the 600 ms endpointer "
             "hangover included (Session timing). Ratios are against `baseline` in the same run.", ""]
    for q, by_setting in report["results"].items():
        base = float(np.median([r["ttfa"] for r in by_setting["baseline"]]))
        lines += [f"## {q} question", "", "| setting | TTFA p50 (s) | TTFA max (s) | vs baseline | TTFT p50 (s) | "
                  "wasted starts | positions prefilled early |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, runs in by_setting.items():
            ttfa = [r["ttfa"] for r in runs]
            lines.append(f"| {name} | {np.median(ttfa):.3f} | {max(ttfa):.3f} | {base / np.median(ttfa):.2f}x | "
                         f"{np.median([r['ttft'] for r in runs]):.3f} | {sum(r['wasted_starts'] for r in runs)} | "
                         f"{runs[0]['prefilled_early']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.turn_latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pace", type=float, default=1.0)
    ap.add_argument("--encoder-mode", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="result stem (default benchmarks/results/turn_latency-BUNDLE)")
    args = ap.parse_args(argv)
    report = run(args.bundle, args.rounds, args.pace, args.encoder_mode, args.max_new_tokens)
    out = args.out or Path(__file__).parent / "results" / f"turn_latency-{args.bundle.name}"
    write_report(out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
