"""A long reply's steady state: is the speech side real time, and where do the cores go?

    python -m omnilite.benchmarks.long_reply BUNDLE [BUNDLE ...] [--rounds 3] [--reply 40,130]
        [--out benchmarks/results/long_reply-NAME]

Each bundle answers the bundled 3.6 s question through a `Session` (simulated microphone at real time,
Silero VAD, the defaults: speculative start and the first-chunk fast path) with a forced reply
(`--reply TEXT,SPEECH`: TEXT tokens, then at most SPEECH more speech tokens; 40,130 gives ~10 s of
LLaMA-Omni2 audio). Bundles are loaded together and interleaved round by round, so their ratios come
from one run on the same host state. Per reply: TTFA, wall RTF (hand-over time after the first chunk
per second of the rest), stall (seconds the speaker ran dry) and underruns, and each stage's busy
seconds per second of audio: their sum against the host's cores is the budget the stall comes from.
Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.devices.host import describe_cpu, detect_host
from omnilite.runtime import Pipeline

from .cost import describe_speed, host_speed
from .report import write_report
from .streaming import package_versions
from .turn_latency import DATA, _first_chunk, base_config, one_turn

SCHEMA = "omnilite.long_reply/1"
STAGES = ("llm_decode", "speech_generator", "flow", "hift")
ROLES = {"llm_decode": "llm", "speech_generator": "speech_generator", "flow": "vocoder", "hift": "vocoder"}  # thread budgets


def run(bundles: list[Path], rounds: int, reply: tuple[int, int]) -> dict:
    host = detect_host()
    speed = host_speed()
    pipes: dict[str, Pipeline] = {}
    try:
        for b in bundles:
            pipes[str(b)] = pipe = Pipeline.load(b, base_config(b, None, *reply))
            _first_chunk(pipe, True)
            one_turn(pipe, DATA / "question.wav", True, 1.0)  # warm-up
        runs: dict[str, list[dict]] = {k: [] for k in pipes}
        threads = {k: {s: p.config.threads_for(ROLES[s]) or host.physical_cores for s in STAGES} for k, p in pipes.items()}
        for _ in range(rounds):
            for name, pipe in pipes.items():
                r = one_turn(pipe, DATA / "question.wav", True, 1.0)
                r["busy_per_audio_s"] = {s: r["stages"].get(s, 0.0) / r["audio_s"] for s in STAGES}
                del r["spans"]
                runs[name].append(r)
    finally:
        for pipe in pipes.values():
            pipe.close()
    return {"schema": SCHEMA, "omnilite": __version__, "cpu": host.cpu_record(), "host_speed": speed,
            "packages": package_versions(), "rounds": rounds, "reply": {"max_new_tokens": reply[0], "tts_tokens": reply[1]},
            "threads": threads, "runs": runs}


def markdown(report: dict) -> str:
    cores = report["cpu"]["physical_cores"]
    lines = ["# Long reply: steady state", "",
             f"- CPU: {describe_cpu(report['cpu'])}",
             f"- Host speed this run: {describe_speed(report.get('host_speed'))}",
             f"- omnilite {report['omnilite']}; {report['rounds']} interleaved rounds; "
             f"replies forced to {report['reply']['max_new_tokens']} text tokens + at most {report['reply']['tts_tokens']} "
             "speech tokens after the text; the bundled 3.6 s question at real time, Silero VAD, the defaults.",
             "- Busy: a stage's seconds of work per second of audio (p50); cores: busy x the stage's threads after "
             f"the first sample, summed. Near the host's {cores} cores the host is saturated: a call's busy time "
             "includes time it waited for a core, so under contention the sum can pass the cores.", "",
             "| bundle | audio (s) | TTFA p50 (s) | wall RTF p50 | stall p50 (s) | underruns | "
             + " | ".join(f"{s} busy" for s in STAGES) + " | cores |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(STAGES) + 1)]
    for name, runs in report["runs"].items():
        med = {s: float(np.median([r["busy_per_audio_s"][s] for r in runs])) for s in STAGES}
        cores_used = sum(med[s] * report["threads"][name][s] for s in STAGES)
        lines.append(f"| {Path(name).name} | {np.median([r['audio_s'] for r in runs]):.1f} | "
                     f"{np.median([r['ttfa'] for r in runs]):.3f} | {np.median([r['wall_rtf'] for r in runs]):.2f} | "
                     f"{np.median([r['stall_s'] for r in runs]):.2f} | {sum(r['underruns'] for r in runs)} | "
                     + " | ".join(f"{med[s]:.2f}" for s in STAGES) + f" | {cores_used:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.long_reply", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reply", default="40,130", metavar="TEXT,SPEECH")
    ap.add_argument("--out", type=Path, default=None, help="result stem (default benchmarks/results/long_reply-FIRST_BUNDLE)")
    args = ap.parse_args(argv)
    text, speech = (int(v) for v in args.reply.split(","))
    out = args.out or Path(__file__).parent / "results" / f"long_reply-{args.bundles[0].name}"
    report = run(args.bundles, args.rounds, (text, speech))
    write_report(out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
