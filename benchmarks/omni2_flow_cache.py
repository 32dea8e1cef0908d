"""LLaMA-Omni2's streamed flow with and without the flow cache, same run, same bundle: flow seconds
per second of audio (one onnxruntime thread by default) for the pipeline's default stream (first
hop 25 tokens, then 50-token chunks, 150-token window), the cache's size, and each stream's mel
drift from whole-utterance synthesis. Writes benchmarks/results/<name>.{json,md}.

    python -m omnilite.benchmarks.omni2_flow_cache BUNDLE [--tokens 250] [--threads 1] [--name NAME]

A bundle exported before the cached stage existed can get it without a full re-export:

    python -m omnilite.benchmarks.omni2_flow_cache OUT --prepare CKPT --source BUNDLE [--precision int8]

copies BUNDLE's flow stages (encoder, estimator, noise) into OUT, exports ``flow_estimator_cached.onnx``
from the checkpoint's ``flow.pt`` (checked in onnxruntime against the PyTorch estimator, fp32) and
quantizes it as ``omnilite quantize`` does for the flow role at that precision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from omnilite.devices.host import describe_cpu, detect_host
from omnilite.runtime.audio import atomic_write_bytes
from omnilite.runtime.bundle import MANIFEST, load_bundle, sha256_file
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.omni2.flow import CACHED_ESTIMATOR, DEFAULT_WINDOW_TOKENS, FIRST_HOP_TOKENS, FlowDecoder, FlowStreamConfig
from omnilite.runtime.onnx_session import SessionOptions

HERE = Path(__file__).parent / "results"
FLOW_STAGES = ("flow_encoder", "flow_estimator", "flow_noise")
TOKEN_RATE = 25  # speech tokens per second of audio


def prepare(ckpt: Path, source: Path, out: Path, precision: str = "int8") -> dict:
    """OUT = SOURCE's flow stages + the cached estimator exported from CKPT at `precision`."""
    from omnilite.export.omni2.checkpoint import Omni2Checkpoint
    from omnilite.export.omni2.export import CACHED_ESTIMATOR_AXES, cached_estimator_parity, cached_example
    from omnilite.export.omni2.flow import CachedEstimatorStage
    from omnilite.export.onnx_export import export_onnx, io_shapes
    from omnilite.quant.onnx_quant import quantize_onnx, role_config

    src = load_bundle(source, verify=False)
    out.mkdir(parents=True, exist_ok=False)
    manifest = json.loads((source / MANIFEST).read_text())
    manifest["stages"] = [s for s in manifest["stages"] if s["name"] in FLOW_STAGES]
    for s in manifest["stages"]:
        for f in [s["file"], *s.get("extra_files", {})]:
            shutil.copy2(src.path / f, out / f)
    flow = Omni2Checkpoint.open(ckpt).flow().eval()
    file = f"{CACHED_ESTIMATOR}.onnx"
    fp32 = out / "fp32" / file
    fp32.parent.mkdir()
    export_onnx(CachedEstimatorStage(flow), cached_example(flow, 80), fp32, *CACHED_ESTIMATOR_AXES)
    parity = cached_estimator_parity(flow, fp32)
    if precision == "fp32":
        shutil.move(fp32, out / file)
        extra, info = [], {"method": "exported fp32"}
    else:
        extra, info = quantize_onnx(fp32, out / file, role_config("flow", precision, fp32))
    shutil.rmtree(out / "fp32")
    inputs, outputs = io_shapes(out / file)
    manifest["stages"].append({"name": CACHED_ESTIMATOR, "file": file, "format": "onnx", "precision": precision,
                               "sha256": sha256_file(out / file), "inputs": inputs, "outputs": outputs,
                               "extra_files": {f: sha256_file(out / f) for f in extra}})
    manifest["flow_cache_prepared"] = {"checkpoint": str(ckpt), "source": str(source), "precision": precision,
                                       "parity_fp32": parity, "quantization": info}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return parity


def _stream(flow: FlowDecoder, units: list[int], config: FlowStreamConfig, burst: int = 10):
    """Units `burst` at a time (the R/W loop's write); -> (mel, flow seconds, stream)."""
    fs = flow.stream(config)
    mels, t0 = [], time.perf_counter()
    for a in range(0, len(units), burst):
        mels.append(fs.push(units[a:a + burst]))
    mels.append(fs.flush())
    return np.concatenate(mels, axis=1), time.perf_counter() - t0, fs


UNCACHED = "uncached (150-token window)"
CACHED = "cached (150-token window, float32 cache)"
CACHED_FP16 = "cached (150-token window, float16 cache)"


def measure(bundle: Path, tokens: int, threads: int, repeats: int) -> dict:
    flow = FlowDecoder(load_bundle(bundle, verify=False), SessionOptions(intra_op_threads=threads))
    if not flow.has_cached_estimator:
        raise SystemExit(f"{bundle} has no {CACHED_ESTIMATOR} stage; prepare one with --prepare CKPT --source BUNDLE.")
    units = np.random.default_rng(0).integers(0, 6561, tokens).tolist()
    seconds = tokens / TOKEN_RATE
    hop = FIRST_HOP_TOKENS
    cases = {UNCACHED: FlowStreamConfig(first_hop_tokens=hop, window_tokens=150, flow_cache=False),
             CACHED: FlowStreamConfig(first_hop_tokens=hop, window_tokens=150, cache_fp16=False),
             CACHED_FP16: FlowStreamConfig(first_hop_tokens=hop, window_tokens=150, cache_fp16=True),
             f"cached, the default stream ({DEFAULT_WINDOW_TOKENS}-token window, "
             f"{'float16' if flow.cache_fp16(None) else 'float32'} cache)": FlowStreamConfig(first_hop_tokens=hop)}
    _stream(flow, units[:60], cases[CACHED])  # warm both sessions (first runs allocate)
    _stream(flow, units[:60], cases[UNCACHED])
    times: dict[str, list[float]] = {k: [] for k in cases}
    mels, streams = {}, {}
    for _ in range(repeats):  # interleaved: both see the same host load
        for name, cfg in cases.items():
            mels[name], dt, streams[name] = _stream(flow, units, cfg)
            times[name].append(dt)
    t0 = time.perf_counter()
    whole = flow.offline(units)
    t_whole = time.perf_counter() - t0
    exact, _, exact_fs = _stream(flow, units, FlowStreamConfig(first_hop_tokens=FIRST_HOP_TOKENS, window_tokens=None))
    res = {"bundle": str(bundle), "tokens": tokens, "audio_s": seconds, "threads": threads, "repeats": repeats,
           "precision": {s.name: s.precision for s in load_bundle(bundle, verify=False).stages.values()},
           "offline_s": t_whole, "cases": {}}
    skip = FIRST_HOP_TOKENS * flow.ratio  # the first hop's frames drift in every stream alike (partial chunk)
    for name, fs in streams.items():
        best = min(times[name])
        res["cases"][name] = {
            "flow_s": best, "flow_s_all": times[name], "flow_s_per_audio_s": best / seconds, "steps": fs.steps,
            "max_estimator_frames": fs.max_window_frames, "exact": fs.exact,
            "mel_max_abs_vs_whole": float(np.abs(mels[name] - whole).max()),
            "mel_snr_db_vs_whole": snr_db(whole.ravel(), mels[name].ravel()),
            "mel_snr_db_vs_whole_after_first_hop": snr_db(whole[:, skip:].ravel(), mels[name][:, skip:].ravel()),
            "mel_max_abs_vs_whole_after_first_hop": float(np.abs(mels[name][:, skip:] - whole[:, skip:]).max()),
            "cache_bytes_max": fs.max_cache_bytes if fs.cache is not None else 0,
            "cache_bytes_per_audio_s": fs.cache.bytes_per_frame * flow.ratio * TOKEN_RATE if fs.cache is not None else 0,
        }
    res["speedup"] = res["cases"][UNCACHED]["flow_s"] / res["cases"][CACHED]["flow_s"]
    res["speedup_fp16_cache"] = res["cases"][UNCACHED]["flow_s"] / res["cases"][CACHED_FP16]["flow_s"]
    res["cached_vs_uncached_mel_max_abs"] = float(np.abs(mels[CACHED] - mels[UNCACHED]).max())
    res["fp16_vs_fp32_cache"] = {"mel_max_abs": float(np.abs(mels[CACHED_FP16] - mels[CACHED]).max()),
                                 "mel_snr_db": snr_db(mels[CACHED].ravel(), mels[CACHED_FP16].ravel())}
    res["cached_exact_window"] = {"cache_bytes_max": exact_fs.max_cache_bytes, "exact": exact_fs.exact,
                                  "mel_max_abs_vs_whole": float(np.abs(exact - whole).max()),
                                  "mel_snr_db_vs_whole": snr_db(whole.ravel(), exact.ravel()),
                                  "mel_snr_db_vs_whole_after_first_hop": snr_db(whole[:, skip:].ravel(), exact[:, skip:].ravel()),
                                  "mel_max_abs_vs_whole_after_first_hop": float(np.abs(exact[:, skip:] - whole[:, skip:]).max())}
    return res


def markdown(res: dict) -> str:
    mib = 1 << 20
    lines = [f"# LLaMA-Omni2 flow cache: {res['tokens']} tokens ({res['audio_s']:.0f} s of audio), {res['threads']} thread(s)", "",
             f"Bundle {res['bundle']} (flow stages: " + ", ".join(f"{k} {v}" for k, v in res["precision"].items()) + "). "
             f"Streams: first hop {FIRST_HOP_TOKENS} tokens, 50-token chunks; the speed-up compares the 150-token window's; best of "
             f"{res['repeats']} interleaved runs. CPU: {describe_cpu(res['cpu'])}", "",
             "Mel vs whole-utterance synthesis (same bundle) over the frames after the first hop (those drift alike in "
             "every stream: solved before their chunk's tokens existed); in brackets over all frames.", "",
             "| stream | flow s | flow s / audio s | steps | max new frames / pass | cache MiB (max) | cache MiB / audio s | mel SNR vs whole (dB) | max abs vs whole |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in res["cases"].items():
        lines.append(f"| {name} | {c['flow_s']:.2f} | {c['flow_s_per_audio_s']:.3f} | {c['steps']} | {c['max_estimator_frames']} | "
                     f"{c['cache_bytes_max'] / mib:.1f} | {c['cache_bytes_per_audio_s'] / mib:.1f} | "
                     f"{c['mel_snr_db_vs_whole_after_first_hop']:.1f} ({c['mel_snr_db_vs_whole']:.1f}) | "
                     f"{c['mel_max_abs_vs_whole_after_first_hop']:.3g} ({c['mel_max_abs_vs_whole']:.3g}) |")
    e = res["cached_exact_window"]
    h = res["fp16_vs_fp32_cache"]
    lines += ["", f"Speed-up (same run): {res['speedup']:.2f}x ({res['speedup_fp16_cache']:.2f}x with the float16 cache). "
              f"Cached vs uncached mel: max abs {res['cached_vs_uncached_mel_max_abs']:.3g}. "
              f"Float16 vs float32 cache: mel SNR {h['mel_snr_db']:.1f} dB, max abs {h['mel_max_abs']:.3g}.",
              f"Cached with window_tokens=None (keeps every chunk): cache {e['cache_bytes_max'] / mib:.1f} MiB at "
              f"{res['audio_s']:.0f} s, mel SNR vs whole {e['mel_snr_db_vs_whole_after_first_hop']:.1f} dB after the first hop "
              f"(max abs {e['mel_max_abs_vs_whole_after_first_hop']:.3g}; int8's per-tensor activation scales depend on the frames "
              "in each pass, so even the exact window differs from the whole solve at int8).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prepare", type=Path, metavar="CKPT", help="make BUNDLE from --source's flow stages + CKPT's cached estimator")
    ap.add_argument("--source", type=Path)
    ap.add_argument("--precision", default="int8", choices=("fp32", "int8"))
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="omni2-flow-cache")
    args = ap.parse_args(argv)
    if args.prepare:
        if not args.source:
            ap.error("--prepare needs --source BUNDLE (the bundle whose flow stages to copy)")
        print(json.dumps(prepare(args.prepare, args.source, args.bundle, args.precision), indent=2))
        return 0
    res = {"cpu": detect_host().cpu_record(), **measure(args.bundle, args.tokens, args.threads, args.repeats)}
    HERE.mkdir(exist_ok=True)
    atomic_write_bytes(HERE / f"{args.name}.json", json.dumps(res, indent=2).encode())
    md = markdown(res)
    atomic_write_bytes(HERE / f"{args.name}.md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
