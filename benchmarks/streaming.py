"""Overlapped vs sequential stages: time to first audio (TTFA) and first text, in one run.

    python -m omnilite.benchmarks.streaming BUNDLE [--runs 20] [--omega 1 2 5 10]

Three ways to answer the same question, measured alternately in one run so that drift on a shared
machine hits all alike:
- overlapped: a worker thread per stage, chunk k spoken while chunk k+1 is produced (the default);
- sequential: the same chunking, stages taking turns in one thread (output identical, checked);
- staged: stages run one after another over the whole reply (LLM, then every unit, then the
  vocoder), as an offline pipeline does; its first audio waits for the last token.
t0 is the respond() call (the question audio is complete), as DESIGN.md defines for respond. A
ratio is baseline p50 / overlapped p50 (above 1: overlapping is faster). Writes JSON and a short
markdown table. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

import omnilite
from omnilite.runtime import Done, Pipeline, PipelineConfig
from omnilite.runtime.audio import read_wav

log = logging.getLogger(__name__)

QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"  # in the source tree and the wheel alike
MODES = ("sequential", "overlapped")
ROWS = MODES + ("staged",)
METRICS = ("ttfa", "ttft", "total")


@dataclass(frozen=True)
class StreamingBench:
    runs: int = 20
    warmup: int = 2
    omegas: tuple[int, ...] = (1, 2, 5, 10)
    max_new_tokens: int = 60
    threads: int | None = None


def package_versions() -> dict[str, str]:
    """Python and the packages whose speed the benchmarks measure."""
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "llama_cpp_python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50) * 1000), "p95_ms": float(np.percentile(a, 95) * 1000)}


def run(bundle: str | Path, bench: StreamingBench = StreamingBench(), question: Path = QUESTION) -> dict:
    audio, rate = read_wav(question)
    results = {
        "benchmark": "streaming: overlapped vs sequential stages",
        "bundle": str(bundle),
        "question": question.name,
        # Load average: other processes on a shared machine slow both modes, not always alike.
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                 "loadavg_1m_before": os.getloadavg()[0]},
        "versions": package_versions(),
        # llama.cpp's CPU backend in the PyPI wheel runs on OpenMP: whether its idle workers spin
        # (the default) or sleep changes how it shares cores with onnxruntime, so it is recorded.
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")},
        "config": {"runs": bench.runs, "warmup": bench.warmup, "max_new_tokens": bench.max_new_tokens,
                   "threads": bench.threads or "default"},
        "omega": {},
    }
    for omega in bench.omegas:
        config = PipelineConfig(omega=omega, max_new_tokens=bench.max_new_tokens, ignore_eos=True, threads=bench.threads)
        # The staged baseline: one chunk as long as the reply, so no unit is made before the last token.
        staged_config = replace(config, omega=bench.max_new_tokens, mode="sequential")
        samples: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in ROWS}
        reference: dict[str, Done] = {}
        with Pipeline.load(bundle, config) as pipe, Pipeline.load(bundle, staged_config) as staged:
            runs = {"sequential": lambda: pipe.respond(audio, rate, mode="sequential"),
                    "overlapped": lambda: pipe.respond(audio, rate, mode="overlapped"),
                    "staged": lambda: staged.respond(audio, rate)}
            for i in range(bench.warmup + bench.runs):
                for row in ROWS[i % len(ROWS):] + ROWS[:i % len(ROWS)]:  # rotate which goes first
                    done = list(runs[row]())[-1]
                    reference.setdefault(row, done)
                    if i >= bench.warmup:
                        for k in METRICS:
                            samples[row][k].append(done.timings[k])
        seq, ovl = reference["sequential"], reference["overlapped"]
        identical = seq.tokens == ovl.tokens and np.array_equal(seq.audio, ovl.audio)
        if not identical:
            log.error("omega %d: overlapped and sequential replies differ", omega)
        entry = {m: {k: _percentiles(v) for k, v in samples[m].items()} for m in ROWS}
        for base in ("sequential", "staged"):
            prefix = "" if base == "sequential" else "staged_"
            entry[f"{prefix}ttfa_ratio_p50"] = entry[base]["ttfa"]["p50_ms"] / entry["overlapped"]["ttfa"]["p50_ms"]
            entry[f"{prefix}total_ratio_p50"] = entry[base]["total"]["p50_ms"] / entry["overlapped"]["total"]["p50_ms"]
        entry["identical_output"] = bool(identical)
        entry["reply_audio_s"] = len(seq.audio) / seq.sample_rate
        results["omega"][str(omega)] = entry
        log.warning("omega %d: TTFA sequential/overlapped %.2f", omega, entry["ttfa_ratio_p50"])
    results["host"]["loadavg_1m_after"] = os.getloadavg()[0]
    return results


def markdown(results: dict) -> str:
    c = results["config"]
    lines = [
        "# Streaming: overlapped vs sequential stages",
        "",
        f"Bundle `{Path(results['bundle']).name}`, question `{results['question']}`, {c['max_new_tokens']} tokens "
        f"(forced), {c['runs']} runs per mode after {c['warmup']} warm-up, modes alternating. Host: "
        f"{results['host']['system']} {results['host']['machine']}, {results['host']['cpus']} CPUs (1-min load "
        f"{results['host']['loadavg_1m_before']:.1f} before, {results['host']['loadavg_1m_after']:.1f} after); "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + "; "
        + (", ".join(f"{k}={v}" for k, v in results.get("env", {}).items() if v) or "no OMP_* variables set") + ".",
        "t0 = the respond() call (complete question audio). Ratio = baseline p50 / overlapped p50; staged = "
        "stages one after another over the whole reply, sequential = the same chunks taking turns in one thread.",
        "",
        "| omega | TTFA staged p50 (ms) | TTFA seq p50 / p95 (ms) | TTFA ovl p50 / p95 (ms) | TTFA staged/ovl | "
        "TTFA seq/ovl | total seq / ovl p50 (ms) | total seq/ovl | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for omega, e in results["omega"].items():
        s, o = e["sequential"], e["overlapped"]
        staged = (f"{e['staged']['ttfa']['p50_ms']:.1f}", f"{e['staged_ttfa_ratio_p50']:.2f}") if "staged" in e else ("-", "-")
        lines.append(
            f"| {omega} | {staged[0]} | {s['ttfa']['p50_ms']:.1f} / {s['ttfa']['p95_ms']:.1f} | {o['ttfa']['p50_ms']:.1f} / "
            f"{o['ttfa']['p95_ms']:.1f} | {staged[1]} | {e['ttfa_ratio_p50']:.2f} | {s['total']['p50_ms']:.1f} / "
            f"{o['total']['p50_ms']:.1f} | {e['total_ratio_p50']:.2f} | {'yes' if e['identical_output'] else 'NO'} |")
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(markdown(results))
    return js, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.streaming", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--omega", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="streaming-tiny")
    p.add_argument("--note", default="", help="a sentence on the conditions, kept in the JSON and the markdown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t = time.perf_counter()
    results = run(args.bundle, StreamingBench(args.runs, args.warmup, tuple(args.omega), args.max_new_tokens, args.threads))
    if args.note:
        results["note"] = args.note
    js, md = write(results, Path(args.out_dir), args.name)
    print(markdown(results))
    for omega, e in results["omega"].items():
        print(f"omega {omega}: TTFA staged/overlapped = {e['staged_ttfa_ratio_p50']:.2f}x, "
              f"sequential/overlapped = {e['ttfa_ratio_p50']:.2f}x")
    print(f"wrote {js} and {md} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
