"""Soak: a long `chat -i FILE` conversation, checking that memory and threads stay flat.

    python -m omnilite.benchmarks.soak [--bundle BUNDLE] [--turns 100] [--pace 4] [--n-ctx 2048] [--record]

The simulated microphone plays the packaged spoken question `--turns` times, each followed by
`--gap-s` of silence, through the same loop as `omnilite chat -i FILE -o OUT` (FileAudio feeding a
Session over one Pipeline, `--pace` times faster than real time). After every reply (Done) it reads
the process's VmRSS and its thread counts (Python threads and the kernel's tasks, which include
onnxruntime's and llama.cpp's native pools). The verdict compares turn 10 (after warm-up) with the
last turn: RSS growth under 5%, no more threads at the end than at turn 10, and no Python thread but
the main one once the session is closed.

`chat -i FILE -o OUT` also records everything the speaker played, for OUT: FileAudio keeps it in
memory as 20 ms arrays, about 70 kB per second of conversation. That growth is by design, a sound
card does not have it, and it would hide a leak of the runtime, so by default the speaker here plays
and forgets (FileAudio's list then holds one shared empty array per block, 8 bytes each); --record
keeps chat's recording and reports its estimated size. The default n_ctx (2048, where chat's is
8192) fills every five turns at this reply length: the KV cache is fully touched before the
reference turn (llama.cpp allocates it whole but the kernel maps its pages as positions are first
written, so with 8192 RSS climbs until turn 24) and the history-dropping path runs about 20 times.
Without --bundle, a tiny LLaMA-Omni bundle is made first (needs the export extra). Writes
soak-NAME.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.cli import DEMO_QUESTION
from omnilite.devices.host import detect_host
from omnilite.runtime import Pipeline, PipelineConfig
from omnilite.runtime.audio import atomic_write_bytes, read_wav, to_mono, write_wav
from omnilite.runtime.audio_io import FileAudio, FileLoopConfig
from omnilite.runtime.events import Done
from omnilite.runtime.session import Session, SessionConfig

from .streaming import package_versions

log = logging.getLogger(__name__)

SCHEMA = "omnilite.soak/1"
MAX_GROWTH = 0.05  # RSS growth allowed from the reference turn to the last


@dataclass(frozen=True)
class SoakConfig:
    turns: int = 100
    pace: float = 4.0  # simulated microphone speed; the reply must fit in the gap at this pace
    gap_s: float = 8.0  # silence after each question: endpoint + pace x compute + reply audio must fit
    max_new_tokens: int = 16  # short replies: the tiny model has random weights and rarely stops by itself
    n_ctx: int = 2048  # full every five turns (see the module docstring)
    record: bool = False  # keep chat -i's speaker recording in memory (as `chat -o` does)
    block_ms: float = 20.0
    reference_turn: int = 10  # growth is measured from here (allocator and caches warmed up)


def conversation_wav(path: Path, turns: int, gap_s: float) -> float:
    """The question `turns` times, each after `gap_s` of silence; returns its length in seconds."""
    audio, rate = read_wav(DEMO_QUESTION)
    audio = to_mono(audio).astype(np.float32)
    gap = np.zeros(int(gap_s * rate), np.float32)
    conversation = np.concatenate([gap, *([audio, gap] * turns)])
    write_wav(path, conversation, rate)
    return len(conversation) / rate


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (the soak needs Linux)")


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _recording_bytes(blocks: int, block_samples: int | None) -> int:
    """What FileAudio's speaker recording holds after `blocks` steps: a list slot per block, and with
    `block_samples` (recording) a float32 array per block, its header and data."""
    return blocks * (8 + (sys.getsizeof(np.zeros(block_samples, np.float32)) if block_samples else 0))


class _ForgetfulSpeaker:
    """The session as FileAudio sees it, except that the speaker's blocks are played and dropped,
    as a sound card does, instead of returned for the recording."""

    _EMPTY = np.zeros(0, np.float32)

    def __init__(self, session: Session):
        self._session = session

    def read_output(self, n: int) -> np.ndarray:
        self._session.read_output(n)
        return self._EMPTY

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def run_soak(bundle: Path, cfg: SoakConfig, work: Path) -> dict:
    wav = work / "conversation.wav"
    seconds = conversation_wav(wav, cfg.turns, cfg.gap_s)
    samples: list[dict] = []
    config = PipelineConfig(max_new_tokens=cfg.max_new_tokens, n_ctx=cfg.n_ctx)
    t_start = time.perf_counter()
    with Pipeline.load(bundle, config) as pipe, Session(pipe, SessionConfig()) as session:
        block_samples = int(round(cfg.block_ms / 1000 * session.output_rate))
        speaker = session if cfg.record else _ForgetfulSpeaker(session)
        audio = FileAudio(speaker, wav, FileLoopConfig(block_ms=cfg.block_ms, pace=cfg.pace))
        audio.start()

        def sample(e: Done) -> None:
            rss = _status_kib("VmRSS") * 1024
            recording = _recording_bytes(audio.stats.blocks, block_samples if cfg.record else None)
            samples.append({"turn": e.turn, "t_s": round(time.perf_counter() - t_start, 2), "rss": rss,
                            "recording": recording, "rss_less_recording": rss - recording,
                            "python_threads": threading.active_count(), "native_threads": _native_threads(),
                            "prompt_tokens": e.stats.get("prompt_tokens"), "context": e.stats.get("context"),
                            "underruns": e.stats.get("underruns", 0), "ttfa_ms": round(e.timings.get("ttfa", 0) * 1000, 1)})
            log.info("turn %d: RSS %.1f MiB", e.turn, rss / 2**20)

        try:
            running = True
            while running:  # the same poll loop as `omnilite chat -i`, drained once more after the file ends
                running = audio.running
                for e in session.poll(0.05 if running else 0):
                    if isinstance(e, Done):
                        sample(e)
            audio.wait()
        finally:
            audio.stop()
        vad = session.vad.name
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return _report(bundle, cfg, seconds, vad, samples, left, _native_threads(), time.perf_counter() - t_start)


def _report(bundle, cfg, seconds, vad, samples, python_threads_left, native_after_close, wall) -> dict:
    if len(samples) < cfg.turns:
        raise RuntimeError(f"only {len(samples)} of {cfg.turns} turns were answered (the pace may be too fast "
                           f"for this machine: lower --pace or raise --gap-s)")
    ref = next(s for s in samples if s["turn"] == cfg.reference_turn)
    last = samples[-1]
    growth = {k: (last[k] - ref[k]) / ref[k] for k in ("rss", "rss_less_recording")}
    host = detect_host()
    return {
        "schema": SCHEMA, "omnilite": __version__, "versions": package_versions(),
        "host": {"cpu": host.cpu_model, "vendor": host.cpu_vendor, "arch": host.arch, "features": sorted(host.features),
                 "physical_cores": host.physical_cores, "logical_cores": host.logical_cores, "ram_gb": round(host.ram_gb, 1),
                 "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "bundle": str(bundle), "config": asdict(cfg), "conversation_s": round(seconds, 1), "wall_s": round(wall, 1),
        "vad": vad, "turns_answered": len(samples),
        "reference": {"turn": ref["turn"], "rss": ref["rss"], "rss_less_recording": ref["rss_less_recording"],
                      "native_threads": ref["native_threads"]},
        "last": {"turn": last["turn"], "rss": last["rss"], "rss_less_recording": last["rss_less_recording"],
                 "recording": last["recording"], "native_threads": last["native_threads"]},
        "growth": growth, "peak_rss": _status_kib("VmHWM") * 1024,
        "threads": {"python_left_after_close": python_threads_left, "native_after_close": native_after_close,
                    "native_max_during": max(s["native_threads"] for s in samples)},
        "ok": {"rss_growth_under_5pct": growth["rss_less_recording"] < MAX_GROWTH,
               "no_thread_growth": last["native_threads"] <= ref["native_threads"],
               "no_python_thread_left": not python_threads_left},
        "samples": samples,
    }


def markdown(r: dict) -> str:
    mib = 2**20
    h, c, ref, last = r["host"], r["config"], r["reference"], r["last"]
    rows = [s for s in r["samples"] if s["turn"] in (1, ref["turn"], 25, 50, 75, last["turn"])]
    lines = [
        f"# Soak: {r['turns_answered']} turns of `chat -i FILE` ({r['bundle']})", "",
        f"host: {h['cpu']} ({h['vendor']}), {h['arch']}, {h['physical_cores']} physical / {h['logical_cores']} logical cores, "
        f"{h['ram_gb']} GiB; CPU features {' '.join(h['features']) or 'none detected'}; load average at the end {h['load_avg_1m_at_end']}",
        f"omnilite {r['omnilite']}, " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"conversation {r['conversation_s']} s at pace {c['pace']:g} ({r['wall_s']} s wall); {c['turns']} questions, "
        f"{c['gap_s']:g} s gaps, {c['max_new_tokens']} tokens per reply, n_ctx {c['n_ctx']}, VAD {r['vad']}; speaker "
        + ("recorded as `chat -o` does" if c["record"] else "plays and forgets (as a sound card)"), "",
        "| turn | RSS MiB | speaker recording MiB | RSS less recording MiB | native threads | prompt tokens | context |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        lines.append(f"| {s['turn']} | {s['rss'] / mib:.1f} | {s['recording'] / mib:.1f} | {s['rss_less_recording'] / mib:.1f} "
                     f"| {s['native_threads']} | {s['prompt_tokens']} | {s['context']} |")
    g, ok, t = r["growth"], r["ok"], r["threads"]
    lines += [
        "",
        f"RSS growth from turn {ref['turn']} to {last['turn']}: **{g['rss_less_recording']:+.2%}** less the speaker recording "
        f"({'under' if ok['rss_growth_under_5pct'] else 'NOT under'} 5%), {g['rss']:+.2%} raw; peak RSS {r['peak_rss'] / mib:.1f} MiB.",
        f"Threads: native {ref['native_threads']} at turn {ref['turn']}, {last['native_threads']} at turn {last['turn']} "
        f"(max {t['native_max_during']}); after the session closed, Python threads left: "
        f"{', '.join(t['python_left_after_close']) or 'none'}, native tasks {t['native_after_close']}.",
        "",
    ]
    return "\n".join(lines)


def _tiny_bundle(work: Path) -> Path:
    """A tiny LLaMA-Omni bundle, made in child processes: torch and the export's memory and threads
    must not be counted in the soak's process."""
    for argv in (["make-tiny", "llama-omni", str(work / "ckpt")], ["export", str(work / "ckpt"), str(work / "bundle")]):
        subprocess.run([sys.executable, "-m", "omnilite", *argv], check=True, stdout=subprocess.DEVNULL)
    return work / "bundle"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="a bundle (default: make a tiny LLaMA-Omni one; needs the export extra)")
    p.add_argument("--turns", type=int, default=SoakConfig.turns)
    p.add_argument("--pace", type=float, default=SoakConfig.pace)
    p.add_argument("--gap-s", type=float, default=SoakConfig.gap_s)
    p.add_argument("--max-new-tokens", type=int, default=SoakConfig.max_new_tokens)
    p.add_argument("--n-ctx", type=int, default=SoakConfig.n_ctx)
    p.add_argument("--record", action="store_true", help="keep chat -i's speaker recording in memory, as `chat -o` does")
    p.add_argument("--name", default="tiny", help="results are written as soak-NAME.json and .md")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = SoakConfig(turns=args.turns, pace=args.pace, gap_s=args.gap_s, max_new_tokens=args.max_new_tokens,
                     n_ctx=args.n_ctx, record=args.record,
                     reference_turn=min(SoakConfig.reference_turn, args.turns))
    with tempfile.TemporaryDirectory(prefix="omnilite-soak-") as tmp:
        bundle = args.bundle or _tiny_bundle(Path(tmp))
        report = run_soak(bundle, cfg, Path(tmp))
    if args.bundle is None:
        report["bundle"] = "tiny LLaMA-Omni (make-tiny + export defaults)"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"soak-{args.name}"
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    text = markdown(report)
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    print(text, end="")
    return 0 if all(report["ok"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
