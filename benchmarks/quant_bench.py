"""Size, load time, latency and peak RSS of every stage at each precision, as ratios to fp32 measured
in the same run.

    python -m omnilite.benchmarks.quant_bench --bundle fp32=DIR --bundle balanced=DIR --bundle small=DIR \\
        [--llm-layers 2 8] [--work DIR] [--rounds 7] [--out-dir benchmarks/results]

Bundles are the real-shape LLaMA-Omni (``make-tiny --shape real``, exported with ``--llm-dtype f16``)
quantized with each preset. ONNX stages run at the real shapes: the encoder + adapter on a 5 s
question (``unpadded`` mode, 500 mel frames), the speech decoder on one chunk of omega = 10 LLM
states (250 frames, empty cache), the vocoder on 1 s of audio (50 frames).

The LLM: an 8B f16 GGUF is 16 GB, and decoding it needs that much memory *per token* on a 24 GB
machine that other work shares, so the decode/prefill ratios are measured on Llama-3.1-8B-width
models (hidden 4096, 32 heads, 8 KV heads, FFN 14336, the real 128256 vocabulary and tokenizer) with
fewer layers, at two depths, and extrapolated to 32 layers with t(L) = a + b L per precision
(a: embedding lookup, output matrix, sampling; b: one layer). Each layer's matrices are the same
shapes as in the 8B model and llama.cpp quantizes each tensor on its own, so per-layer cost ratios
carry over; the fit separates out the output matrix, which Q4_K_M keeps at Q6_K. File-size ratios of
the full 8B are read from the bundles themselves.

Latency: all precisions of a stage are loaded in this process and called in alternating rounds, so
drift on a shared machine hits them alike; p50/p95 wall time and the median process CPU time
per call are reported. Load time and peak RSS come from a fresh child process per file (page cache
warm: the file was just read). Torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import omnilite
from omnilite.runtime.bundle import Bundle, load_bundle

from .streaming import package_versions

log = logging.getLogger(__name__)

QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"  # in the source tree and the wheel alike
ONNX_STAGES = ("encoder", "speech_generator", "vocoder")
LLM_TYPES = ("F16", "Q8_0", "Q4_K_M")
REAL_LAYERS = 32


def _versions() -> dict[str, str]:
    return {**package_versions(), "cpu": _cpu_name(), "cores": str(os.cpu_count())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _files_bytes(bundle: Bundle, stage: str) -> int:
    s = bundle.stages[stage]
    return sum((bundle.path / f).stat().st_size for f in [s.file, *s.extra_files])


# --- inputs at the real shapes ------------------------------------------------------------------

def stage_inputs(bundle: Bundle, stage: str, seconds: float = 5.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if stage == "encoder":
        from omnilite.runtime.audio import prepare_speech, read_wav
        from omnilite.runtime.mel import LogMel

        audio, rate = read_wav(QUESTION)
        speech = prepare_speech(audio, rate, 16000)
        speech = np.resize(speech, int(16000 * seconds))  # repeat the question to exactly `seconds`
        return {"mel": LogMel(int(bundle["encoder"]["n_mels"]))(speech, pad_to_30s=False)[None]}
    if stage == "speech_generator":
        cfg = bundle["speech_generator"]
        empty = np.zeros((cfg["layers"], 1, cfg["heads"], 0, cfg["head_dim"]), np.float32)
        omega = int(bundle["streaming"]["omega"])
        return {"hidden": rng.standard_normal((1, omega, bundle["llm"]["n_embd"])).astype(np.float32),
                "past_key": empty, "past_value": empty}
    if stage == "vocoder":
        return {"frame_units": rng.integers(0, 1000, (1, 50)).astype(np.int64)}
    raise ValueError(stage)


# --- child process: load time and peak RSS ------------------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _child(kind: str, path: str, bundle_dir: str, stage: str, threads: int) -> dict:
    """Runs in a fresh interpreter: load one stage file, run it once, report load time and RSS."""
    base = _rss_mb()
    t = time.perf_counter()
    if kind == "onnx":
        from omnilite.runtime.onnx_session import SessionOptions, open_session

        session = open_session(Path(path), SessionOptions(intra_op_threads=threads))
        load = time.perf_counter() - t
        session.run(None, stage_inputs(load_bundle(bundle_dir, verify=False), stage))
    else:
        from omnilite.runtime.llm import LlamaCppLLM, LLMConfig

        llm = LlamaCppLLM(Path(path), LLMConfig(n_ctx=512, n_threads=threads))
        load = time.perf_counter() - t
        llm.eval_tokens(list(range(1000, 1032)))
        first = llm.eval_tokens([1032], want_last=True)
        list(llm.generate(8, ignore_eos=True, first=first))
        llm.close()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child of a big parent
    # would report the parent's size; VmHWM belongs to the new address space.
    peak = _status_mb("VmHWM")
    return {"load_s": load, "peak_rss_mb": peak, "baseline_rss_mb": base}


def child_measure(kind: str, path: Path, bundle_dir: Path | str, stage: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "omnilite.benchmarks.quant_bench", "--child", kind, str(path), str(bundle_dir), stage,
           str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- alternating latency rounds ------------------------------------------------------------------

def alternate(calls: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, dict]:
    """Call every variant once per round, in a rotating order; wall and CPU time per call."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    names = list(calls)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            calls[n]()
            wall[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
    return {n: {"p50_ms": float(np.percentile(wall[n], 50) * 1e3), "p95_ms": float(np.percentile(wall[n], 95) * 1e3),
                "cpu_ms": float(np.median(cpu[n]) * 1e3), "runs": rounds} for n in names}


def bench_onnx_stages(bundles: dict[str, Bundle], rounds: int, threads: int) -> dict:
    from tqdm import tqdm

    from omnilite.runtime.onnx_session import SessionOptions, open_session

    base = bundles["fp32"]
    out: dict[str, dict] = {}
    for stage in tqdm(ONNX_STAGES, desc="onnx stages", unit="stage"):
        inputs = stage_inputs(base, stage)
        rows: dict[str, dict] = {}
        calls: dict[str, Callable[[], None]] = {}
        by_sha: dict[str, str] = {}
        for name, b in bundles.items():
            s = b.stages[stage]
            rows[name] = {"precision": s.precision, "bytes": _files_bytes(b, stage)}
            if s.sha256 in by_sha:  # the same file (hard link): measured once
                rows[name]["same_file_as"] = by_sha[s.sha256]
                continue
            by_sha[s.sha256] = name
            rows[name].update(child_measure("onnx", b.file(stage), b.path, stage, threads))
            session = open_session(b.file(stage), SessionOptions(intra_op_threads=threads))
            calls[name] = lambda session=session: session.run(None, inputs)
        timing = alternate(calls, rounds)
        del calls
        for name, row in rows.items():
            row.update(timing[row.get("same_file_as", name)])
            if "same_file_as" in row:
                row.update({k: rows[row["same_file_as"]][k] for k in ("load_s", "peak_rss_mb")})
        ref = rows["fp32"]
        for row in rows.values():
            row["size_ratio"] = row["bytes"] / ref["bytes"]
            row["speedup_wall"] = ref["p50_ms"] / row["p50_ms"]
            row["speedup_cpu"] = ref["cpu_ms"] / row["cpu_ms"]
            row["rss_ratio"] = row["peak_rss_mb"] / ref["peak_rss_mb"]
            row["load_ratio"] = row["load_s"] / ref["load_s"]
        out[stage] = {"input": {k: list(v.shape) for k, v in inputs.items()}, "rows": rows}
    return out


# --- the LLM at real width --------------------------------------------------------------------

class _RandomLlama:
    """HF-named tensors of a Llama-3.1-8B-width model with `layers` layers, made on demand (one at a time)."""

    def __init__(self, config: dict):
        self.config = config
        self._names = self._shapes()

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        d, ff, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
        hd = d // c["num_attention_heads"]
        kv = c["num_key_value_heads"] * hd
        out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            out |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                    p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)}
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> "_LazyRandom":
        return _LazyRandom(name, self._names[name])


class _LazyRandom:
    """Shape now, values (seeded by the name) only when the GGUF writer converts the tensor."""

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name, self.shape = name, shape

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        import zlib

        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        if len(self.shape) == 1:
            a = 1.0 + 0.1 * rng.standard_normal(self.shape, dtype=np.float32)
        else:
            a = rng.standard_normal(self.shape, dtype=np.float32) / np.float32(np.sqrt(self.shape[1]))
        return a if dtype is None else a.astype(dtype, copy=False)


def make_llm_ggufs(work: Path, layers: int) -> dict[str, Path]:
    """F16 GGUF of a real-width Llama with `layers` layers, and its Q8_0 / Q4_K_M quantizations."""
    from omnilite.export.gguf_llm import write_llama_gguf
    from omnilite.export.tiny import SHAPES, llm_config, tokenizer_dir
    from omnilite.quant.gguf_quant import quantize_gguf

    work.mkdir(parents=True, exist_ok=True)
    config = llm_config(SHAPES["real"]) | {"num_hidden_layers": layers}
    paths = {t: work / f"llama8b-width-{layers}L-{t}.gguf" for t in LLM_TYPES}
    if not paths["F16"].exists():
        write_llama_gguf(_RandomLlama(config), config, tokenizer_dir(), paths["F16"], dtype="f16",
                         name=f"llama-8b-width-{layers}L", progress=True)
    for t in LLM_TYPES[1:]:
        if not paths[t].exists():
            quantize_gguf(paths["F16"], paths[t], t)
    return paths


def bench_llm(work: Path, depths: tuple[int, ...], rounds: int, threads: int, decode_tokens: int = 16,
              prefill_tokens: int = 128) -> dict:
    from omnilite.quant.gguf_quant import gguf_tensor_types
    from omnilite.runtime.llm import LlamaCppLLM, LLMConfig

    out: dict = {"depths": {}}
    prompt = list(range(1000, 1000 + prefill_tokens))
    for layers in depths:
        paths = make_llm_ggufs(work, layers)
        rows = {t: {"bytes": p.stat().st_size, "tensor_types": gguf_tensor_types(p), **child_measure("gguf", p, "-", "llm", threads)}
                for t, p in paths.items()}
        llms = {t: LlamaCppLLM(p, LLMConfig(n_ctx=prefill_tokens + decode_tokens + 8, n_threads=threads)) for t, p in paths.items()}

        def decode(llm: LlamaCppLLM) -> tuple[float, float]:
            """Wall and CPU seconds per generated token, the prompt's prefill not counted."""
            llm.reset()
            llm.eval_tokens(prompt[:8])
            first = llm.eval_tokens(prompt[8:9], want_last=True)
            t, c = time.perf_counter(), time.process_time()
            for _ in llm.generate(decode_tokens + 1, ignore_eos=True, first=first):
                pass  # the first token comes from the prompt: decode_tokens evaluations follow it
            return (time.perf_counter() - t) / decode_tokens, (time.process_time() - c) / decode_tokens

        def prefill(llm: LlamaCppLLM) -> None:
            llm.reset()
            llm.eval_tokens(prompt, want_last=True)

        names = list(llms)
        for llm in llms.values():
            decode(llm)  # warm-up
        per_token: dict[str, list[tuple[float, float]]] = {t: [] for t in names}
        for r in range(rounds):  # rotating order, as in alternate()
            for t in names[r % len(names):] + names[:r % len(names)]:
                per_token[t].append(decode(llms[t]))
        pre = alternate({t: (lambda llm=llm: prefill(llm)) for t, llm in llms.items()}, max(3, rounds // 2))
        for llm in llms.values():
            llm.close()
        for t, row in rows.items():
            row["decode_ms_per_token"] = float(np.median([w for w, _ in per_token[t]]) * 1e3)
            row["decode_p95_ms_per_token"] = float(np.percentile([w for w, _ in per_token[t]], 95) * 1e3)
            row["decode_cpu_ms_per_token"] = float(np.median([c for _, c in per_token[t]]) * 1e3)
            row["prefill_ms"] = pre[t]["p50_ms"]
            row["prefill_cpu_ms"] = pre[t]["cpu_ms"]
        ref = rows["F16"]
        for row in rows.values():
            row["size_ratio"] = row["bytes"] / ref["bytes"]
            row["decode_speedup"] = ref["decode_ms_per_token"] / row["decode_ms_per_token"]
            row["decode_speedup_cpu"] = ref["decode_cpu_ms_per_token"] / row["decode_cpu_ms_per_token"]
            row["prefill_speedup"] = ref["prefill_ms"] / row["prefill_ms"]
            row["rss_ratio"] = row["peak_rss_mb"] / ref["peak_rss_mb"]
        out["depths"][layers] = rows
        log.info("llm %d layers: %s", layers, {t: round(r["decode_ms_per_token"], 1) for t, r in rows.items()})
    if len(depths) >= 2:
        lo, hi = min(depths), max(depths)
        fit = {}
        for t in LLM_TYPES:
            for key in ("decode_ms_per_token", "decode_cpu_ms_per_token", "prefill_ms"):
                a_lo, a_hi = out["depths"][lo][t][key], out["depths"][hi][t][key]
                per_layer = (a_hi - a_lo) / (hi - lo)
                fixed = a_lo - per_layer * lo
                fit.setdefault(t, {})[key] = {"fixed_ms": fixed, "per_layer_ms": per_layer,
                                              f"at_{REAL_LAYERS}_layers_ms": fixed + per_layer * REAL_LAYERS}
        ref = fit["F16"]
        for t in LLM_TYPES:
            for key in ("decode_ms_per_token", "decode_cpu_ms_per_token", "prefill_ms"):
                f = fit[t][key]
                f["speedup_vs_f16"] = ref[key][f"at_{REAL_LAYERS}_layers_ms"] / f[f"at_{REAL_LAYERS}_layers_ms"]
                f["per_layer_speedup_vs_f16"] = ref[key]["per_layer_ms"] / f["per_layer_ms"]
        out["extrapolated"] = fit
    return out


def llm_sizes(bundles: dict[str, Bundle]) -> dict:
    from omnilite.quant.gguf_quant import gguf_tensor_types

    rows = {}
    for name, b in bundles.items():
        rows[name] = {"precision": b.stages["llm"].precision, "bytes": _files_bytes(b, "llm"),
                      "tensor_types": gguf_tensor_types(b.file("llm"))}
    ref = next(r for r in rows.values() if r["precision"] in ("f16", "F16"))
    for r in rows.values():
        r["size_ratio_vs_f16"] = r["bytes"] / ref["bytes"]
    return rows


# --- report ---------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# Quantization: size and speed per stage ({v['cpu']}, {v['cores']} cores)", "",
             f"onnxruntime {v['onnxruntime']}, llama-cpp-python {v['llama_cpp_python']}, {result['threads']} threads; "
             "real-shape LLaMA-Omni stages with random weights; every ratio is against fp32 (LLM: F16) measured in the "
             "same run, with the variants called in alternating rounds on a machine shared with other work. "
             "speedup = fp32 p50 / variant p50 (wall); cpu = the same on process CPU time. Load time and peak RSS: a "
             "fresh process per file, page cache warm.", ""]
    if result.get("onnx"):
        lines += ["| stage | input | preset | precision | size MiB | size ratio | load s | p50 ms | p95 ms | speedup | speedup (cpu) | peak RSS MiB | RSS ratio |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, st in result.get("onnx", {}).items():
        inp = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in st["input"].items() if k != "past_value")
        for preset, r in st["rows"].items():
            lines.append(f"| {stage} | {inp} | {preset} | {r['precision']} | {r['bytes'] / 2**20:.1f} | {r['size_ratio']:.3f} | "
                         f"{r['load_s']:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['speedup_wall']:.2f} | "
                         f"{r['speedup_cpu']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} |")
    if result.get("llm_sizes"):
        lines += ["", "## LLM files of the real 8B bundles", "", "| preset | type | size MiB | ratio to F16 | tensor types |", "|---|---|---:|---:|---|"]
        for preset, r in result["llm_sizes"].items():
            types = ", ".join(f"{k} {n}" for k, n in r["tensor_types"].items())
            lines.append(f"| {preset} | {r['precision']} | {r['bytes'] / 2**20:.0f} | {r['size_ratio_vs_f16']:.3f} | {types} |")
    llm = result.get("llm")
    if llm:
        lines += ["", "## LLM decode and prefill at Llama-3.1-8B width (fewer layers, see the module docstring)", "",
                  "| layers | type | size MiB | load s | decode ms/token | decode speedup | decode speedup (cpu) | prefill 128 ms | prefill speedup | peak RSS MiB |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for layers, rows in llm["depths"].items():
            for t, r in rows.items():
                lines.append(f"| {layers} | {t} | {r['bytes'] / 2**20:.0f} | {r['load_s']:.2f} | {r['decode_ms_per_token']:.1f} | "
                             f"{r['decode_speedup']:.2f} | {r['decode_speedup_cpu']:.2f} | {r['prefill_ms']:.0f} | "
                             f"{r['prefill_speedup']:.2f} | {r['peak_rss_mb']:.0f} |")
        if "extrapolated" in llm:
            lines += ["", f"Fit t(L) = fixed + per_layer x L through the two depths, evaluated at L = {REAL_LAYERS}:", "",
                      "| type | decode ms/token at 32 L | decode speedup at 32 L | per-layer decode speedup | decode speedup (cpu) at 32 L | prefill speedup at 32 L |",
                      "|---|---:|---:|---:|---:|---:|"]
            for t, f in llm["extrapolated"].items():
                d, c, p = f["decode_ms_per_token"], f["decode_cpu_ms_per_token"], f["prefill_ms"]
                lines.append(f"| {t} | {d[f'at_{REAL_LAYERS}_layers_ms']:.0f} | {d['speedup_vs_f16']:.2f} | "
                             f"{d['per_layer_speedup_vs_f16']:.2f} | {c['speedup_vs_f16']:.2f} | {p['speedup_vs_f16']:.2f} |")
    return "\n".join(lines) + "\n"


def run(bundle_dirs: dict[str, Path], work: Path, depths: tuple[int, ...], rounds: int, threads: int,
        skip_onnx: bool = False, skip_llm: bool = False) -> dict:
    bundles = {name: load_bundle(p, verify=False) for name, p in bundle_dirs.items()}
    if "fp32" not in bundles:
        raise SystemExit("pass the unquantized bundle as --bundle fp32=DIR")
    result: dict = {"versions": _versions(), "threads": threads, "rounds": rounds,
                    "bundles": {k: str(v) for k, v in bundle_dirs.items()}}
    if not skip_onnx:
        result["onnx"] = bench_onnx_stages(bundles, rounds, threads)
    result["llm_sizes"] = llm_sizes(bundles)
    if not skip_llm and depths:
        result["llm"] = bench_llm(work, depths, rounds, threads)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.quant_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR", help="fp32=DIR (required), balanced=DIR, small=DIR ...")
    p.add_argument("--llm-layers", type=int, nargs="*", default=[2, 6], help="depths of the real-width LLMs (two or more)")
    p.add_argument("--work", default="quant-bench-work", help="where the real-width LLM GGUFs are written (GBs)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--skip-llm", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="quant_speed", help="output file stem")
    args = p.parse_args(argv)
    if args.child:
        kind, path, bundle_dir, stage, threads = args.child
        print(json.dumps(_child(kind, path, bundle_dir, stage, int(threads))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dirs = dict(item.split("=", 1) for item in args.bundle)
    result = run({k: Path(v) for k, v in dirs.items()}, Path(args.work), tuple(args.llm_layers), args.rounds, args.threads,
                 args.skip_onnx, args.skip_llm)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
